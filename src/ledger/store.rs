//! Where journaled rows end up: Redis (shared by every replica) or, without
//! Redis, the embedded SQLite database. Both keep, per tenant and UTC day,
//! one counter per field (see [`super::report`] for the vocabulary: the
//! model is part of a field in Redis, a column of its own in SQLite), and per
//! journal run, tenant and day the highest row number applied: a batch
//! carries the number of its last row and is applied only if that number is
//! higher, atomically with the marker (a Lua script; a transaction), so a
//! batch retried after a lost reply, or shipped again from a journal after a
//! crash, is applied once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::report::{join_model, split_model};
use crate::date::Day;
use crate::metering::LEGACY_MODEL;
use crate::redis_store::{tenant_tag, RedisStore, StoreError};

/// Field deltas (or totals) of one (tenant, day).
pub(crate) type Fields = BTreeMap<String, i64>;

/// The rows of one (run, tenant, day) after the last one applied, up to and
/// including row `to`, summed.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    pub(crate) run: Arc<str>,
    pub(crate) tenant: Arc<str>,
    pub(crate) day: Day,
    pub(crate) to: u64,
    pub(crate) fields: Fields,
}

/// The fields of one (tenant, day) as stored, named as in Redis (with
/// their model).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub(crate) tenant: String,
    pub(crate) day: Day,
    pub(crate) fields: Vec<(String, i64)>,
}

#[derive(Debug)]
pub(crate) enum SinkError {
    Redis(StoreError),
    Sqlite(String),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Redis(e) => e.fmt(f),
            SinkError::Sqlite(e) => write!(f, "sqlite: {e}"),
        }
    }
}

impl From<rusqlite::Error> for SinkError {
    fn from(e: rusqlite::Error) -> SinkError {
        SinkError::Sqlite(e.to_string())
    }
}

/// Registered tenants, so reports find tenants no longer in config.
const TENANTS_SET: &str = "eg:ledger:tenants";
/// How long Redis remembers the last row applied of a run: longer than a
/// journal may wait on a stopped replica before it is shipped.
const MARKER_TTL_SECS: u64 = 40 * 86_400;
/// How long SQLite remembers them (no memory cost there).
const SQLITE_MARKER_KEEP_SECS: i64 = 400 * 86_400;

/// KEYS[1] the ledger hash, KEYS[2] the run's last applied row for it;
/// ARGV[1] the batch's last row, ARGV[2] TTL, then field/delta pairs.
const APPLY_SCRIPT: &str = r#"
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) <= last then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
for i = 3, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"#;

pub(crate) fn ledger_key(tenant: &str, day: Day) -> String {
    format!("{}:ledger:{day}", tenant_tag(tenant))
}

fn marker_key(tenant: &str, day: Day, run: &str) -> String {
    format!("{}:ledger-seq:{day}:{run}", tenant_tag(tenant))
}

pub(crate) enum Sink {
    Redis {
        redis: Arc<RedisStore>,
        script: redis::Script,
        registered: Mutex<HashSet<Arc<str>>>,
    },
    Sqlite(Arc<Sqlite>),
}

impl Sink {
    pub(crate) fn redis(redis: Arc<RedisStore>) -> Sink {
        Sink::Redis {
            redis,
            script: redis::Script::new(APPLY_SCRIPT),
            registered: Mutex::new(HashSet::new()),
        }
    }

    /// Applies each batch at most once; `Ok` means it is in the ledger
    /// (now, or already before).
    pub(crate) async fn apply(&self, batches: Vec<Batch>) -> Vec<Result<(), SinkError>> {
        match self {
            Sink::Redis {
                redis,
                script,
                registered,
            } => {
                let mut out = Vec::with_capacity(batches.len());
                for b in &batches {
                    let r = apply_redis(redis, script, b).await;
                    if r.is_ok() {
                        register(redis, registered, &b.tenant).await;
                    }
                    out.push(r.map_err(SinkError::Redis));
                }
                out
            }
            Sink::Sqlite(db) => {
                let n = batches.len();
                let db = db.clone();
                let r = tokio::task::spawn_blocking(move || db.apply(&batches))
                    .await
                    .map_err(|e| SinkError::Sqlite(e.to_string()))
                    .and_then(|r| r.map_err(SinkError::from));
                match r {
                    Ok(()) => (0..n).map(|_| Ok(())).collect(),
                    Err(e) => {
                        let msg = e.to_string();
                        (0..n)
                            .map(|_| Err(SinkError::Sqlite(msg.clone())))
                            .collect()
                    }
                }
            }
        }
    }

    /// The last row of `run` applied for each (tenant, day); 0 for none.
    pub(crate) async fn applied(
        &self,
        run: &Arc<str>,
        groups: &[(Arc<str>, Day)],
    ) -> Result<Vec<u64>, SinkError> {
        match self {
            Sink::Redis { redis, .. } => {
                let mut out = Vec::with_capacity(groups.len());
                for (tenant, day) in groups {
                    let key = marker_key(tenant, *day, run);
                    let v: Option<u64> = redis
                        .call("ledger", true, |mut c| async move {
                            redis::cmd("GET").arg(&key).query_async(&mut c).await
                        })
                        .await
                        .map_err(SinkError::Redis)?;
                    out.push(v.unwrap_or(0));
                }
                Ok(out)
            }
            Sink::Sqlite(db) => {
                let db = db.clone();
                let run = run.clone();
                let groups = groups.to_vec();
                tokio::task::spawn_blocking(move || db.applied(&run, &groups))
                    .await
                    .map_err(|e| SinkError::Sqlite(e.to_string()))?
                    .map_err(SinkError::from)
            }
        }
    }

    /// Every stored (tenant, day) in `from..=to`, for all tenants (those
    /// with rows, and `known`) or one.
    pub(crate) async fn read(
        &self,
        from: Day,
        to: Day,
        tenant: Option<&str>,
        known: &[String],
    ) -> Result<Vec<Stored>, SinkError> {
        match self {
            Sink::Redis { redis, .. } => read_redis(redis, from, to, tenant, known)
                .await
                .map_err(SinkError::Redis),
            Sink::Sqlite(db) => {
                let db = db.clone();
                let tenant = tenant.map(str::to_string);
                tokio::task::spawn_blocking(move || db.read(from, to, tenant.as_deref()))
                    .await
                    .map_err(|e| SinkError::Sqlite(e.to_string()))?
                    .map_err(SinkError::from)
            }
        }
    }

    /// Redis, when it is down; the shipper waits for it instead of trying.
    pub(crate) fn redis_down(&self) -> Option<&RedisStore> {
        match self {
            Sink::Redis { redis, .. } if !redis.is_up() => Some(redis),
            _ => None,
        }
    }
}

async fn apply_redis(
    redis: &RedisStore,
    script: &redis::Script,
    b: &Batch,
) -> Result<(), StoreError> {
    let key = ledger_key(&b.tenant, b.day);
    let marker = marker_key(&b.tenant, b.day, &b.run);
    let fields = &b.fields;
    let to = b.to;
    redis
        .call("ledger", true, |mut c| async move {
            let mut inv = script.key(&key);
            inv.key(&marker).arg(to).arg(MARKER_TTL_SECS);
            for (f, v) in fields {
                inv.arg(f).arg(*v);
            }
            inv.invoke_async::<i64>(&mut c).await
        })
        .await
        .map(|_| ())
}

/// Adds the tenant to the set reports list, once per process.
async fn register(redis: &RedisStore, registered: &Mutex<HashSet<Arc<str>>>, tenant: &Arc<str>) {
    let new = registered
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(tenant.clone());
    if !new {
        return;
    }
    let name = tenant.to_string();
    let r = redis
        .call("ledger", true, |mut c| async move {
            redis::cmd("SADD")
                .arg(TENANTS_SET)
                .arg(&name)
                .query_async::<i64>(&mut c)
                .await
        })
        .await;
    if r.is_err() {
        registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }
}

async fn read_redis(
    redis: &RedisStore,
    from: Day,
    to: Day,
    tenant: Option<&str>,
    known: &[String],
) -> Result<Vec<Stored>, StoreError> {
    let tenants: Vec<String> = match tenant {
        Some(t) => vec![t.to_string()],
        None => {
            let mut set: Vec<String> = redis
                .call("ledger_read", true, |mut c| async move {
                    redis::cmd("SMEMBERS")
                        .arg(TENANTS_SET)
                        .query_async::<Vec<String>>(&mut c)
                        .await
                })
                .await?;
            set.extend(known.iter().cloned());
            set.sort();
            set.dedup();
            set
        }
    };
    let mut out = Vec::new();
    for t in tenants {
        // One pipeline per tenant: its keys share a slot (Redis Cluster).
        let mut pipe = redis::pipe();
        let mut days = Vec::new();
        let mut d = from;
        while d <= to {
            pipe.cmd("HGETALL").arg(ledger_key(&t, d));
            days.push(d);
            d = d.next();
        }
        let maps: Vec<HashMap<String, i64>> = redis
            .call("ledger_read", true, |mut c| async move {
                pipe.query_async(&mut c).await
            })
            .await?;
        for (day, fields) in days.into_iter().zip(maps) {
            if !fields.is_empty() {
                out.push(Stored {
                    tenant: t.clone(),
                    day,
                    fields: fields.into_iter().collect(),
                });
            }
        }
    }
    Ok(out)
}

/// The embedded ledger: one SQLite file (WAL, `synchronous = FULL`, so a
/// batch is on disk before its journal rows may be deleted).
pub(crate) struct Sqlite {
    conn: Mutex<Connection>,
    /// The `usage` table has the `model` column (a database of an earlier
    /// version opened by `embedgate usage` may not: its rows are
    /// [`LEGACY_MODEL`]'s).
    has_model: bool,
}

/// The `usage` table: per tenant, day and model, one value per field
/// (the field without its model: `<m>|<c>|<what>`, `requests|<c>`).
const USAGE_TABLE: &str = "
CREATE TABLE IF NOT EXISTS usage (
  tenant TEXT NOT NULL,
  day TEXT NOT NULL,
  model TEXT NOT NULL DEFAULT 'multimodal-embedding-one-peace-v1',
  field TEXT NOT NULL,
  value INTEGER NOT NULL,
  PRIMARY KEY (tenant, day, model, field)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_day ON usage (day);";

/// An earlier version's `usage` table (no model; its primary key cannot
/// change in place) becomes this version's: copied under
/// [`LEGACY_MODEL`], in one transaction.
const MIGRATE_TO_MODELS: &str = "
ALTER TABLE usage RENAME TO usage_before_models;
DROP INDEX IF EXISTS usage_by_day;
CREATE TABLE usage (
  tenant TEXT NOT NULL,
  day TEXT NOT NULL,
  model TEXT NOT NULL DEFAULT 'multimodal-embedding-one-peace-v1',
  field TEXT NOT NULL,
  value INTEGER NOT NULL,
  PRIMARY KEY (tenant, day, model, field)
) WITHOUT ROWID;
INSERT INTO usage (tenant, day, model, field, value)
  SELECT tenant, day, 'multimodal-embedding-one-peace-v1', field, value FROM usage_before_models;
DROP TABLE usage_before_models;
CREATE INDEX usage_by_day ON usage (day);";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS applied (
  run TEXT NOT NULL,
  tenant TEXT NOT NULL,
  day TEXT NOT NULL,
  last_row INTEGER NOT NULL,
  updated INTEGER NOT NULL,
  PRIMARY KEY (run, tenant, day)
) WITHOUT ROWID;
PRAGMA user_version = 2;
";

/// True when `usage` exists and has a `model` column; `None` when there
/// is no `usage` table.
fn usage_has_model(conn: &Connection) -> rusqlite::Result<Option<bool>> {
    let mut q = conn.prepare("SELECT name FROM pragma_table_info('usage')")?;
    let cols: Vec<String> = q
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<_, _>>()?;
    Ok(if cols.is_empty() {
        None
    } else {
        Some(cols.iter().any(|c| c == "model"))
    })
}

/// Brings an earlier version's database to this one (see
/// [`MIGRATE_TO_MODELS`]); nothing to do for a new or current one.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if usage_has_model(&tx)? == Some(false) {
        tx.execute_batch(MIGRATE_TO_MODELS)?;
        tracing::info!(
            model = LEGACY_MODEL,
            "ledger database: the usage table gained a model column; its rows are this model's"
        );
    }
    tx.commit()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Sqlite {
    /// Opens the database the gateway writes, creating it (and its
    /// directory) if need be.
    pub(crate) fn create(path: &Path) -> Result<Sqlite, String> {
        let shown = path.display();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                format!("ledger.sqlite_path {shown}: cannot create its directory: {e}")
            })?;
        }
        let mut db = Sqlite::open_with(path, OpenFlags::SQLITE_OPEN_CREATE)
            .map_err(|e| format!("ledger.sqlite_path {shown}: {e}"))?;
        {
            let mut conn = db.conn();
            migrate(&mut conn).map_err(|e| {
                format!("ledger.sqlite_path {shown}: cannot add the model column: {e}")
            })?;
            conn.execute_batch(USAGE_TABLE)
                .and_then(|()| conn.execute_batch(SCHEMA))
                .and_then(|()| {
                    conn.execute(
                        "DELETE FROM applied WHERE updated < ?1",
                        params![now_secs() - SQLITE_MARKER_KEEP_SECS],
                    )
                })
                .map_err(|e| format!("ledger.sqlite_path {shown}: {e}"))?;
        }
        db.has_model = true;
        Ok(db)
    }

    /// Opens an existing database to read it (`embedgate usage`).
    pub(crate) fn open_existing(path: &Path) -> Result<Sqlite, String> {
        if !path.exists() {
            return Err(format!(
                "no ledger at ledger.sqlite_path {} (the gateway creates it when it starts; a relative path is relative to the working directory)",
                path.display()
            ));
        }
        // Read as it is: a gateway of the earlier version may be writing it.
        let mut db = Sqlite::open_with(path, OpenFlags::empty())
            .map_err(|e| format!("ledger.sqlite_path {}: {e}", path.display()))?;
        let has_model = usage_has_model(&db.conn())
            .map_err(|e| format!("ledger.sqlite_path {}: {e}", path.display()))?;
        db.has_model = has_model.unwrap_or(true);
        Ok(db)
    }

    fn open_with(path: &Path, extra: OpenFlags) -> rusqlite::Result<Sqlite> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let _mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Ok(Sqlite {
            conn: Mutex::new(conn),
            has_model: false,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All batches in one transaction: one disk flush per shipment.
    pub(crate) fn apply(&self, batches: &[Batch]) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut last = tx.prepare_cached(
                "SELECT last_row FROM applied WHERE run = ?1 AND tenant = ?2 AND day = ?3",
            )?;
            let mut add = tx.prepare_cached(
                "INSERT INTO usage (tenant, day, model, field, value) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (tenant, day, model, field) DO UPDATE SET value = value + excluded.value",
            )?;
            let mut mark = tx.prepare_cached(
                "INSERT INTO applied (run, tenant, day, last_row, updated) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (run, tenant, day) DO UPDATE SET last_row = excluded.last_row, updated = excluded.updated",
            )?;
            let now = now_secs();
            for b in batches {
                let day = b.day.to_string();
                let to = i64::try_from(b.to).unwrap_or(i64::MAX);
                let done: Option<i64> = last
                    .query_row(params![&*b.run, &*b.tenant, &day], |r| r.get(0))
                    .optional()?;
                if done.is_some_and(|d| d >= to) {
                    continue;
                }
                for (f, v) in &b.fields {
                    let (model, field) = split_model(f);
                    add.execute(params![&*b.tenant, &day, model, field, v])?;
                }
                mark.execute(params![&*b.run, &*b.tenant, &day, to, now])?;
            }
        }
        tx.commit()
    }

    pub(crate) fn applied(
        &self,
        run: &str,
        groups: &[(Arc<str>, Day)],
    ) -> rusqlite::Result<Vec<u64>> {
        let conn = self.conn();
        let mut q = conn.prepare_cached(
            "SELECT last_row FROM applied WHERE run = ?1 AND tenant = ?2 AND day = ?3",
        )?;
        groups
            .iter()
            .map(|(tenant, day)| {
                let v: Option<i64> = q
                    .query_row(params![run, &**tenant, day.to_string()], |r| r.get(0))
                    .optional()?;
                Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
            })
            .collect()
    }

    pub(crate) fn read(
        &self,
        from: Day,
        to: Day,
        tenant: Option<&str>,
    ) -> rusqlite::Result<Vec<Stored>> {
        let conn = self.conn();
        let model = if self.has_model {
            "model"
        } else {
            "'multimodal-embedding-one-peace-v1'"
        };
        let mut q = conn.prepare_cached(&format!(
            "SELECT tenant, day, {model}, field, value FROM usage
             WHERE day >= ?1 AND day <= ?2 AND (?3 IS NULL OR tenant = ?3)
             ORDER BY tenant, day"
        ))?;
        let rows = q.query_map(params![from.to_string(), to.to_string(), tenant], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
            ))
        })?;
        let mut out: Vec<Stored> = Vec::new();
        for row in rows {
            let (t, d, m, f, v) = row?;
            let f = join_model(&m, &f);
            let Some(day) = Day::parse(&d) else {
                continue;
            };
            match out.last_mut() {
                Some(s) if s.tenant == t && s.day == day => s.fields.push((f, v)),
                _ => out.push(Stored {
                    tenant: t,
                    day,
                    fields: vec![(f, v)],
                }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: &str = "text-embedding-v4|text|miss|units";

    fn batch(run: &str, to: u64, units: i64) -> Batch {
        Batch {
            run: Arc::from(run),
            tenant: Arc::from("search"),
            day: Day::from_days(20_000),
            to,
            fields: Fields::from([(F.to_string(), units)]),
        }
    }

    #[test]
    fn sqlite_applies_a_batch_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ledger.sqlite");
        let missing = Sqlite::open_existing(&path).err().unwrap();
        assert!(missing.contains("no ledger at"), "{missing}");
        let db = Sqlite::create(&path).unwrap();
        db.apply(&[batch("r1", 3, 5), batch("r2", 1, 1)]).unwrap();
        // A retry, and an older batch: both already applied.
        db.apply(&[batch("r1", 3, 5), batch("r1", 2, 7)]).unwrap();
        db.apply(&[batch("r1", 4, 10)]).unwrap();
        let day = Day::from_days(20_000);
        let key: Arc<str> = Arc::from("search");
        assert_eq!(
            db.applied("r1", &[(key.clone(), day), (key.clone(), day.next())])
                .unwrap(),
            vec![4, 0]
        );
        drop(db);
        let db = Sqlite::open_existing(&path).unwrap();
        let stored = db.read(day, day, None).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].fields, vec![(F.to_string(), 16)]);
        assert!(db.read(day, day, Some("ads")).unwrap().is_empty());
        assert!(db.read(day.next(), day.next(), None).unwrap().is_empty());
        // The model is a column of its own.
        let (model, field): (String, String) = db
            .conn()
            .query_row("SELECT model, field FROM usage", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(
            (model.as_str(), field.as_str()),
            ("text-embedding-v4", "text|miss|units")
        );
    }

    /// The schema of the version before models, as it created it.
    const SCHEMA_BEFORE_MODELS: &str = "
CREATE TABLE usage (
  tenant TEXT NOT NULL,
  day TEXT NOT NULL,
  field TEXT NOT NULL,
  value INTEGER NOT NULL,
  PRIMARY KEY (tenant, day, field)
) WITHOUT ROWID;
CREATE INDEX usage_by_day ON usage (day);
CREATE TABLE applied (
  run TEXT NOT NULL,
  tenant TEXT NOT NULL,
  day TEXT NOT NULL,
  last_row INTEGER NOT NULL,
  updated INTEGER NOT NULL,
  PRIMARY KEY (run, tenant, day)
) WITHOUT ROWID;
PRAGMA user_version = 1;
";

    #[test]
    fn a_database_from_before_models_is_read_and_migrated() {
        assert!(USAGE_TABLE.contains(LEGACY_MODEL));
        assert!(MIGRATE_TO_MODELS.contains(LEGACY_MODEL));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        let day = Day::from_days(20_000);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_BEFORE_MODELS).unwrap();
            for (f, v) in [("text|miss|units", 7), ("requests|miss", 2)] {
                conn.execute(
                    "INSERT INTO usage (tenant, day, field, value) VALUES ('search', ?1, ?2, ?3)",
                    params![day.to_string(), f, v],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO applied VALUES ('r1', 'search', ?1, 9, ?2)",
                params![day.to_string(), now_secs()],
            )
            .unwrap();
        }
        let want = vec![
            (format!("{LEGACY_MODEL}|text|miss|units"), 7),
            (format!("requests|{LEGACY_MODEL}|miss"), 2),
        ];
        let sorted = |mut v: Vec<(String, i64)>| {
            v.sort();
            v
        };
        // `embedgate usage` reads it as it is, without changing it.
        let db = Sqlite::open_existing(&path).unwrap();
        assert!(!db.has_model);
        let stored = db.read(day, day, None).unwrap();
        assert_eq!(sorted(stored[0].fields.clone()), sorted(want.clone()));
        drop(db);
        assert_eq!(
            usage_has_model(&Connection::open(&path).unwrap()).unwrap(),
            Some(false)
        );
        // The gateway migrates it: rows kept as one-peace's, markers kept,
        // new rows under their model.
        let db = Sqlite::create(&path).unwrap();
        assert!(db.has_model);
        assert_eq!(
            db.applied("r1", &[(Arc::from("search"), day)]).unwrap(),
            vec![9]
        );
        db.apply(&[batch("r1", 9, 100), batch("r2", 1, 3)]).unwrap();
        let mut want_after = want;
        want_after.push((F.to_string(), 3));
        let stored = db.read(day, day, None).unwrap();
        assert_eq!(sorted(stored[0].fields.clone()), sorted(want_after.clone()));
        drop(db);
        // Opening again changes nothing.
        let db = Sqlite::create(&path).unwrap();
        let stored = db.read(day, day, None).unwrap();
        assert_eq!(sorted(stored[0].fields.clone()), sorted(want_after));
        let version: i64 = db
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
    }
}
