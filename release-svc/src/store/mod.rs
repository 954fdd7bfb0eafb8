//! Storage: one trait, with an SQLite and a PostgreSQL backend behind it.
//!
//! # Layout
//!
//! - [`Store`]: every read and write of release-svc. Placement events, the consumer cursor
//!   and the withdrawals they cause are written in one transaction.
//! - [`sql`]: the one implementation of [`Store`], its SQL written once against
//!   the shared crate's `Db`, over a [`sql::Backend`] that provides transactions.
//! - `forms`: the stored forms of features, releases and policies, decoded strictly.
//! - [`sqlite`]: the embedded default (WAL, `synchronous=FULL`).
//! - [`postgres`]: PostgreSQL, for a `postgres://` database URL (replicas).
//! - `migrations/sqlite/`, `migrations/postgres/`: embedded schema migrations per backend.

mod forms;
pub mod postgres;
pub mod sql;
pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::model::{Feature, Millis, Release};
use crate::domain::placements::Placement;
use crate::domain::policy::Policy;
use crate::domain::Result;

/// Everything stored, loaded at start.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Features by key.
    pub features: BTreeMap<String, Arc<Feature>>,
    /// Releases by id.
    pub releases: BTreeMap<i64, Release>,
    /// Placements.
    pub placements: Vec<Placement>,
    /// The consumer cursor.
    pub cursor: u64,
    /// Events applied so far.
    pub events_applied: u64,
    /// Environment policies by environment.
    pub policies: BTreeMap<String, Policy>,
}

/// The placements committed since a replica last read them (by another replica, the
/// applier), with the consumer's position after them.
#[derive(Debug, Default)]
pub struct PlacementsAfter {
    /// Placements whose stored sequence is above the one asked for, by sequence.
    pub placements: Vec<Placement>,
    /// The consumer cursor.
    pub cursor: u64,
    /// Events applied so far.
    pub events_applied: u64,
}

/// What another replica committed, as far as this one needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    /// Only placement events were applied: reading the placements since the last read
    /// is enough.
    Placements,
    /// Anything else (features, releases, policies, a resync of every placement), or the
    /// replica may have missed notifications: reload everything.
    Everything,
}

/// Wake-ups of a replica when others commit (see [`Store::changes`]). Notifications that
/// arrive while the replica is busy are folded into one wake-up; a wake-up asks for
/// [`Changed::Everything`] if any of them was more than placements.
#[derive(Debug)]
pub struct Changes {
    wake: tokio::sync::mpsc::Receiver<()>,
    everything: Arc<std::sync::atomic::AtomicBool>,
}

impl Changes {
    /// A receiver and the sender side: `notify(everything)` records a change and wakes it.
    pub fn channel() -> (Self, ChangeNotifier) {
        let (tx, wake) = tokio::sync::mpsc::channel(1);
        let everything = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            Self {
                wake,
                everything: everything.clone(),
            },
            ChangeNotifier { tx, everything },
        )
    }

    /// The next change; `None` once the sender is gone.
    pub async fn recv(&mut self) -> Option<Changed> {
        self.wake.recv().await?;
        Some(
            if self
                .everything
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                Changed::Everything
            } else {
                Changed::Placements
            },
        )
    }
}

/// The sending side of [`Changes`].
#[derive(Debug, Clone)]
pub struct ChangeNotifier {
    tx: tokio::sync::mpsc::Sender<()>,
    everything: Arc<std::sync::atomic::AtomicBool>,
}

impl ChangeNotifier {
    /// Records a change (the flag first, so the wake-up that follows sees it) and wakes
    /// the receiver (a wake-up already pending covers this one).
    pub fn notify(&self, changed: Changed) {
        if changed == Changed::Everything {
            self.everything
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let _ = self.tx.try_send(());
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// One audit record to append (with the change it records, in its transaction). Its
/// `principal` is `system` for automatic actions; a new release's `resource` is given as
/// `releases/` and completed with the release's id.
pub use service_kit::audit::AuditRecord as AuditEntry;

/// Which audit records to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Resource name or prefix (empty: all).
    pub resource_prefix: String,
    /// Only the resource named by `resource_prefix` itself (not the names it prefixes).
    pub exact: bool,
    /// Exact principal (empty: all).
    pub principal: String,
    /// From (inclusive).
    pub start_ms: Option<Millis>,
    /// To (exclusive).
    pub end_ms: Option<Millis>,
    /// Records with an id above this.
    pub after_id: i64,
    /// At most this many.
    pub limit: usize,
}

/// A durable record of an automatic withdrawal.
#[derive(Debug, Clone, PartialEq)]
pub struct Withdrawal {
    /// Feature key.
    pub feature: String,
    /// Environment id.
    pub environment: String,
    /// Why.
    pub reason: String,
    /// The placement sequence that caused it.
    pub sequence: u64,
    /// When.
    pub time_ms: Millis,
}

/// Evaluations of one feature in one environment that served one variant, in one hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCount {
    /// Feature key.
    pub feature: String,
    /// Environment (`*`: environments no release names).
    pub environment: String,
    /// Variant served.
    pub variant: String,
    /// The start of the hour (Unix milliseconds).
    pub hour_ms: Millis,
    /// Evaluations.
    pub count: u64,
}

/// When a feature was last evaluated in an environment (to the flush).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastEvaluated {
    /// Feature key.
    pub feature: String,
    /// Environment.
    pub environment: String,
    /// When (the flush that wrote it).
    pub time_ms: Millis,
}

/// Every read and write of release-svc.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A signal for every change committed by any other process sharing the database
    /// (replicas reload their state from it, or read the placements since their last read);
    /// `None` when this process is the only writer (SQLite).
    async fn changes(&self) -> Option<Changes> {
        None
    }
    /// The placements stored with a sequence above `after`, and the consumer's position.
    async fn placements_after(&self, after: u64) -> Result<PlacementsAfter>;
    /// Waits until this process holds the right to apply placement events (one replica at
    /// a time); the returned token is cancelled when the right is lost. SQLite: at once,
    /// for good.
    async fn applier_lease(
        &self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<tokio_util::sync::CancellationToken> {
        Ok(stop.child_token())
    }
    /// Whether the store can still write: true until it cannot (a panic while it held the
    /// SQLite connection), then false for good. The serve loop turns health NOT_SERVING on
    /// false.
    fn writer_alive(&self) -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(true).1
    }
    /// Loads everything (at start).
    async fn load(&self) -> Result<Loaded>;
    /// Inserts a new feature (ALREADY_EXISTS if the key is taken), with its audit record.
    async fn insert_feature(&self, feature: Feature, audit: AuditEntry) -> Result<()>;
    /// Replaces a feature if its stored revision is `expected` (ABORTED otherwise).
    async fn update_feature(
        &self,
        feature: Feature,
        expected: i64,
        audit: AuditEntry,
    ) -> Result<()>;
    /// Inserts a release and returns its id; with a request id seen before, returns the
    /// first release's id instead (and `false`, appending no record).
    async fn insert_release(
        &self,
        release: Release,
        request_id: Option<String>,
        audit: AuditEntry,
    ) -> Result<(i64, bool)>;
    /// Replaces a release if its stored revision is `expected`; appends `audit` (several
    /// records for an automatic step that is also an override, for example).
    async fn update_release(
        &self,
        release: Release,
        expected: i64,
        audit: Vec<AuditEntry>,
    ) -> Result<()>;
    /// Writes an environment's policy if its stored revision is `expected` (0: none yet).
    async fn put_policy(&self, policy: Policy, expected: i64, audit: AuditEntry) -> Result<()>;
    /// Lists audit records by id ascending.
    async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<(i64, AuditEntry)>>;
    /// Applies placement events, advances the cursor and records withdrawals (each also as
    /// an `auto.withdraw` audit record), atomically. Returns the new events_applied counter.
    async fn apply_placements(
        &self,
        events: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<u64>;
    /// Replaces every placement with a snapshot at `cursor` (a resync), with withdrawals.
    async fn replace_placements(
        &self,
        placements: Vec<Placement>,
        cursor: u64,
        withdrawals: Vec<Withdrawal>,
    ) -> Result<()>;
    /// Adds evaluation counts (to the hour's counts already stored: replicas add theirs),
    /// records the hours' features as evaluated at `now_ms`, and drops counts of hours
    /// before `prune_before_ms`, in one transaction. Changes nothing Evaluate decides
    /// (replicas are not told).
    async fn add_usage(
        &self,
        counts: Vec<UsageCount>,
        now_ms: Millis,
        prune_before_ms: Millis,
    ) -> Result<()>;
    /// The hourly counts of `feature` from `since_ms` on, and when it was last evaluated
    /// per environment.
    async fn usage(
        &self,
        feature: String,
        since_ms: Millis,
    ) -> Result<(Vec<UsageCount>, Vec<LastEvaluated>)>;
    /// When each feature was last evaluated, in any environment.
    async fn last_evaluated(&self) -> Result<Vec<(String, Millis)>>;
    /// Lists withdrawals, newest first, before the id `before` (exclusive).
    async fn list_withdrawals(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Withdrawal)>>;
}
