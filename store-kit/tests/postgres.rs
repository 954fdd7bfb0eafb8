//! The PostgreSQL executor against a real server (`TEST_DATABASE_URL`; without it this test
//! says so and passes: `scripts/test` always sets it).

#![allow(clippy::unwrap_used)]

use service_kit::error::Error;
use store_kit::postgres::{IsolationLevel, PgDb, Pool, PoolConfig};
use store_kit::{p, Db, Dialect, V};

#[tokio::test]
async fn statements_arrays_streams_and_errors_on_a_real_server() {
    let Ok(url) = std::env::var("TEST_DATABASE_URL") else {
        eprintln!("TEST_DATABASE_URL is not set: skipped");
        return;
    };
    let schema = format!("store_kit_{}", std::process::id());
    let pool = Pool::start(PoolConfig {
        name: "test",
        url,
        size: 2,
        init: format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"),
        wait_metric: None,
    })
    .unwrap();
    let outcome = pool
        .run(move |conn| {
            store_kit::postgres::migrate(
                &mut conn.client,
                917_000_001,
                &["CREATE TABLE t (id BIGINT PRIMARY KEY, name TEXT NOT NULL, note TEXT)"],
            )?;
            let db = PgDb::begin(conn, IsolationLevel::ReadCommitted, false).unwrap();
            let dbr: &dyn Db = &db;
            assert_eq!(dbr.dialect(), Dialect::Postgres);
            // Arrays: many rows in one statement; `?N` placeholders become `$N`.
            let n = dbr.execute(
                "INSERT INTO t (id, name) SELECT * FROM unnest(?1::bigint[], ?2::text[])",
                &[
                    V::Is(vec![1, 2, 3]),
                    V::Ts(vec!["a".into(), "b".into(), "c".into()]),
                ],
            )?;
            assert_eq!(n, 3);
            // Rows by name, strictly; NULL as None.
            let (name, note): (String, Option<String>) =
                dbr.row("SELECT name, note FROM t WHERE id = ?1", p![2i64], |r| {
                    Ok((r.col("name")?, r.col("note")?))
                })?;
            assert_eq!((name.as_str(), note), ("b", None));
            let wrong = dbr.row("SELECT name FROM t WHERE id = ?1", p![2i64], |r| {
                r.col::<i64>("name")
            });
            assert!(matches!(wrong, Err(Error::Internal(_))), "{wrong:?}");
            // Streamed rows, in order.
            let mut ids = Vec::new();
            dbr.each("SELECT id FROM t ORDER BY id", &[], &mut |r| {
                ids.push(r.col::<i64>("id")?);
                Ok(())
            })?;
            assert_eq!(ids, [1, 2, 3]);
            // A unique key taken is a conflict: a runner would run the transaction again.
            let taken = dbr.execute("INSERT INTO t (id, name) VALUES (?1, ?2)", p![1i64, "x"]);
            let failed = db.failed(taken.unwrap_err());
            assert!(failed.retry, "{:?}", failed.error);
            drop(db);
            conn.client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .map_err(|e| store_kit::postgres::error(&e))?;
            Ok(())
        })
        .await;
    pool.close().await;
    outcome.unwrap();
}
