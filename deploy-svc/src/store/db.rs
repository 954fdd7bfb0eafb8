//! The small SQL surface the application layer's SQL is written against, so one
//! implementation of every read and write runs on SQLite and on PostgreSQL: the shared
//! [`store_kit`] one.

pub(crate) use store_kit::p;
pub use store_kit::{Db, Dialect, FromV, SqlRow, ToV, V};
