//! Storage: one trait, the SQLite backend behind it (PostgreSQL follows in a later issue).
//!
//! # Layout
//!
//! - [`Store`]: every read and write of release-svc. Placement events, the consumer cursor
//!   and the withdrawals they cause are written in one transaction.
//! - [`sqlite`]: the embedded default (WAL, `synchronous=FULL`).
//! - `migrations/sqlite/`: embedded schema migrations.

pub mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::model::{Feature, Millis, Release};
use crate::domain::placements::Placement;
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

/// Every read and write of release-svc.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Loads everything (at start).
    async fn load(&self) -> Result<Loaded>;
    /// Inserts a new feature (ALREADY_EXISTS if the key is taken).
    async fn insert_feature(&self, feature: Feature) -> Result<()>;
    /// Replaces a feature if its stored revision is `expected` (ABORTED otherwise).
    async fn update_feature(&self, feature: Feature, expected: i64) -> Result<()>;
    /// Inserts a release and returns its id; with a request id seen before, returns the
    /// first release's id instead (and `false`).
    async fn insert_release(
        &self,
        release: Release,
        request_id: Option<String>,
    ) -> Result<(i64, bool)>;
    /// Replaces a release if its stored revision is `expected`.
    async fn update_release(&self, release: Release, expected: i64) -> Result<()>;
    /// Applies placement events, advances the cursor and records withdrawals, atomically.
    /// Returns the new events_applied counter.
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
    /// Lists withdrawals, newest first, before the id `before` (exclusive).
    async fn list_withdrawals(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, Withdrawal)>>;
}
