//! The visibility matrix: how Evaluate decides each feature in each environment, and why.
//!
//! Read under the writers' lock from the state and the snapshot published with it, so a
//! cell always agrees with what Evaluate answers at that moment: the governing release and
//! the gate come from the snapshot, the rest (plan steps, waits, the coverage a gated
//! feature waits for, paused and pending releases) from the state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::{Engine, State};
use crate::domain::evaluate::Snapshot;
use crate::domain::model::{Feature, Release, ReleaseState};
use crate::domain::placements::CoverageView;
use crate::domain::PreconditionViolation;

/// How Evaluate decides a feature in one environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The feature is disabled.
    Disabled,
    /// No active release puts it here.
    NotReleased,
    /// Released here, the carrier below coverage.
    NotDeployed,
    /// The release that would show it is paused.
    Paused,
    /// Released below 100%.
    Rollout,
    /// Released at 100% with rules or lists deciding per context.
    Targeted,
    /// Released at 100%, the same answer for everyone.
    Static,
}

/// One (feature, environment) cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The environment.
    pub environment: String,
    /// The decision class.
    pub class: Class,
    /// The rollout percentage of `release` here (0 without one).
    pub rollout_percent: f64,
    /// The governing release, else a paused one, else one on its way (id, state).
    pub release: Option<(i64, ReleaseState)>,
    /// The plan step `release` is at here, 1-based (0: none).
    pub step: usize,
    /// The plan steps of `release` here.
    pub steps: usize,
    /// NOT_DEPLOYED: what the carrier waits for.
    pub not_deployed: String,
    /// The rules `release`'s next step waits on, when that step is here.
    pub waiting: Vec<PreconditionViolation>,
}

/// One feature's row.
#[derive(Debug, Clone)]
pub struct Row {
    /// The feature.
    pub feature: Arc<Feature>,
    /// A rule or a list decides per context.
    pub targeted: bool,
    /// One cell per environment of the matrix.
    pub cells: Vec<Cell>,
}

/// At most this many cells (features x environments) in one page: with many environments a
/// page holds fewer features, so one call costs the same whatever the fleet's shape.
pub const MAX_CELLS_PER_PAGE: usize = 10_000;

/// At most this many environments (columns) in one page: with more, a page's features come
/// with a chunk of the columns, and the next page carries on with the next chunk.
pub const MAX_COLUMNS_PER_PAGE: usize = 200;

/// Where a page starts: after this feature (by key), and, within the columns, after this
/// environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The rows start after this feature key.
    pub feature: Option<String>,
    /// The columns start after this environment.
    pub environment: Option<String>,
}

/// A page of the matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// The columns of this page, sorted.
    pub environments: Vec<String>,
    /// The rows, by feature key.
    pub rows: Vec<Row>,
    /// Where the next page starts, if there is one.
    pub next: Option<Cursor>,
}

impl Engine {
    /// A page of the matrix for `environment` (else every environment known here) and
    /// `feature` (else every feature), starting at `from`: at most `limit` rows, at most
    /// [`MAX_COLUMNS_PER_PAGE`] columns and at most [`MAX_CELLS_PER_PAGE`] cells.
    pub async fn visibility(
        &self,
        environment: Option<&str>,
        feature: Option<&str>,
        from: &Cursor,
        limit: usize,
    ) -> Matrix {
        let state = self.state.lock().await;
        let snapshot = self.snapshot.load();
        let all = match environment {
            Some(e) => vec![e.to_owned()],
            None => known_environments(&state),
        };
        // Rows per page from the widest chunk, the same for every chunk of columns: each
        // chunk of a page's columns must cover the same features.
        let per_row = all.len().clamp(1, MAX_COLUMNS_PER_PAGE);
        let limit = limit.min((MAX_CELLS_PER_PAGE / per_row).max(1));
        let mut columns: Vec<String> = all
            .into_iter()
            .filter(|e| from.environment.as_ref().is_none_or(|a| e > a))
            .take(MAX_COLUMNS_PER_PAGE + 1)
            .collect();
        let more_columns = columns.len() > MAX_COLUMNS_PER_PAGE;
        columns.truncate(MAX_COLUMNS_PER_PAGE);
        let mut page: Vec<&Arc<Feature>> = state
            .features
            .values()
            .filter(|f| f.archived_ms.is_none())
            .filter(|f| feature.is_none_or(|k| f.key == k))
            .filter(|f| from.feature.as_ref().is_none_or(|a| &f.key > a))
            .take(limit + 1)
            .collect();
        let more_rows = page.len() > limit;
        page.truncate(limit);
        let next = if page.is_empty() {
            None
        } else if more_columns {
            // The same features, the next columns.
            Some(Cursor {
                feature: from.feature.clone(),
                environment: columns.last().cloned(),
            })
        } else if more_rows {
            Some(Cursor {
                feature: page.last().map(|f| f.key.clone()),
                environment: None,
            })
        } else {
            None
        };
        let view = state.placements.coverage_view();
        let inactive = not_active(&state, &page);
        let rows = page
            .into_iter()
            .map(|f| {
                let cells = columns
                    .iter()
                    .map(|env| {
                        let shown = inactive.get(&(f.key.as_str(), env.as_str())).copied();
                        cell(&state, &snapshot, &view, f, env, shown)
                    })
                    .collect();
                Row {
                    feature: f.clone(),
                    targeted: targeted(f),
                    cells,
                }
            })
            .collect();
        Matrix {
            environments: columns,
            rows,
            next,
        }
    }
}

/// Every environment a release, a policy or a placement names.
fn known_environments(state: &State) -> Vec<String> {
    let mut names: BTreeSet<&str> = state
        .releases
        .values()
        .flat_map(|r| r.environments.iter().map(|e| e.environment.as_str()))
        .collect();
    names.extend(state.policies.keys().map(String::as_str));
    names.extend(state.placements.iter().map(|p| p.environment.as_str()));
    names.into_iter().map(str::to_owned).collect()
}

fn targeted(f: &Feature) -> bool {
    f.targeting.is_some() || !f.allow.is_empty() || !f.deny.is_empty()
}

/// One cell; `inactive` is the release [`not_active`] found for it.
fn cell(
    state: &State,
    snapshot: &Snapshot,
    view: &CoverageView<'_>,
    f: &Feature,
    env: &str,
    inactive: Option<&Release>,
) -> Cell {
    let governing = snapshot.governing(&f.key, env);
    let shown = match governing {
        Some(g) => state.releases.get(&g.release),
        None => inactive,
    };
    let mut cell = Cell {
        environment: env.to_owned(),
        class: Class::NotReleased,
        rollout_percent: 0.0,
        release: None,
        step: 0,
        steps: 0,
        not_deployed: String::new(),
        waiting: Vec::new(),
    };
    if let Some(r) = shown {
        cell.release = Some((r.id, r.state));
        if let Some(e) = r.environments.iter().find(|e| e.environment == env) {
            cell.rollout_percent = e.rollout_percent;
            cell.step = e.step.map_or(0, |s| s + 1);
            cell.steps = e.steps.len();
        }
        let next_here = r
            .next_step()
            .and_then(|(i, _)| r.environments.get(i))
            .is_some_and(|e| e.environment == env);
        if next_here {
            cell.waiting = r.governance.waiting.clone();
        }
    }
    cell.class = match governing {
        _ if f.disabled => Class::Disabled,
        None if shown.is_some_and(|r| r.state == ReleaseState::Paused) => Class::Paused,
        None => Class::NotReleased,
        Some(g) if !g.deployed => {
            cell.not_deployed = view.gate(env, &f.carriers).err().unwrap_or_default();
            Class::NotDeployed
        }
        Some(g) if g.rollout_percent < 100.0 => Class::Rollout,
        Some(_) if targeted(f) => Class::Targeted,
        Some(_) => Class::Static,
    };
    cell
}

/// Per (feature, environment) of the page, the release that is not active but names it
/// there: a paused one first (the kill switch is what an operator looks for), else the
/// newest on its way (draft, planned, approved). One pass over the releases for the whole
/// page.
fn not_active<'a>(
    state: &'a State,
    page: &[&'a Arc<Feature>],
) -> HashMap<(&'a str, &'a str), &'a Release> {
    let wanted: HashSet<&str> = page.iter().map(|f| f.key.as_str()).collect();
    let mut paused = HashMap::new();
    let mut pending = HashMap::new();
    // Newest first: the first release found for a cell is the newest.
    for r in state.releases.values().rev() {
        let into = match r.state {
            ReleaseState::Paused => &mut paused,
            ReleaseState::Approved | ReleaseState::Planned | ReleaseState::Draft => &mut pending,
            _ => continue,
        };
        for key in r.features.iter().filter(|k| wanted.contains(k.as_str())) {
            for e in &r.environments {
                into.entry((key.as_str(), e.environment.as_str()))
                    .or_insert(r);
            }
        }
    }
    for (cell, r) in pending {
        paused.entry(cell).or_insert(r);
    }
    paused
}
