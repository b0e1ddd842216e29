//! The one seam between the transitions and a database: a transaction that runs SQL
//! with typed arguments and hands back rows of plain values. Both backends implement
//! [`Db`]; everything above it (`ops`) is written once. The SQL is PostgreSQL's
//! (`$1` placeholders, `FOR UPDATE … SKIP LOCKED`, `= ANY($n)`); [`sqlite_dialect`]
//! says it the way SQLite does, where a transaction holds the whole database anyway.

use crate::{Result, StoreError};

/// An argument of a statement, borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg<'a> {
    /// SQL NULL.
    Null,
    /// An integer (also a boolean column's value where the database has none).
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(&'a str),
    /// Bytes.
    Bytes(&'a [u8]),
    /// A list of integers, for `= ANY($n)`.
    Ints(&'a [i64]),
    /// A list of texts, for `= ANY($n)`.
    Texts(&'a [String]),
}

/// What can be passed as an [`Arg`].
pub(crate) trait IntoArg<'a> {
    /// The argument.
    fn arg(self) -> Arg<'a>;
}

macro_rules! int_args {
    ($($t:ty),*) => {$(
        impl<'a> IntoArg<'a> for $t {
            fn arg(self) -> Arg<'a> {
                Arg::Int(self as i64)
            }
        }
        impl<'a> IntoArg<'a> for &$t {
            fn arg(self) -> Arg<'a> {
                Arg::Int(*self as i64)
            }
        }
        impl<'a> IntoArg<'a> for Option<$t> {
            fn arg(self) -> Arg<'a> {
                self.map_or(Arg::Null, |v| Arg::Int(v as i64))
            }
        }
        impl<'a> IntoArg<'a> for &Option<$t> {
            fn arg(self) -> Arg<'a> {
                self.map_or(Arg::Null, |v| Arg::Int(v as i64))
            }
        }
    )*};
}
int_args!(i64, i32, u32, u64, usize);

impl<'a> IntoArg<'a> for f64 {
    fn arg(self) -> Arg<'a> {
        Arg::Real(self)
    }
}
impl<'a> IntoArg<'a> for &f64 {
    fn arg(self) -> Arg<'a> {
        Arg::Real(*self)
    }
}
impl<'a> IntoArg<'a> for Option<f64> {
    fn arg(self) -> Arg<'a> {
        self.map_or(Arg::Null, Arg::Real)
    }
}
impl<'a> IntoArg<'a> for &Option<f64> {
    fn arg(self) -> Arg<'a> {
        self.map_or(Arg::Null, Arg::Real)
    }
}
impl<'a> IntoArg<'a> for bool {
    fn arg(self) -> Arg<'a> {
        Arg::Bool(self)
    }
}
impl<'a> IntoArg<'a> for &bool {
    fn arg(self) -> Arg<'a> {
        Arg::Bool(*self)
    }
}
impl<'a> IntoArg<'a> for &'a str {
    fn arg(self) -> Arg<'a> {
        Arg::Text(self)
    }
}
impl<'a> IntoArg<'a> for &&'a str {
    fn arg(self) -> Arg<'a> {
        Arg::Text(self)
    }
}
impl<'a> IntoArg<'a> for &'a String {
    fn arg(self) -> Arg<'a> {
        Arg::Text(self)
    }
}
impl<'a> IntoArg<'a> for Option<&'a str> {
    fn arg(self) -> Arg<'a> {
        self.map_or(Arg::Null, Arg::Text)
    }
}
impl<'a> IntoArg<'a> for &Option<&'a str> {
    fn arg(self) -> Arg<'a> {
        self.map_or(Arg::Null, Arg::Text)
    }
}
impl<'a> IntoArg<'a> for &'a Option<String> {
    fn arg(self) -> Arg<'a> {
        self.as_deref().map_or(Arg::Null, Arg::Text)
    }
}
impl<'a> IntoArg<'a> for &'a [u8] {
    fn arg(self) -> Arg<'a> {
        Arg::Bytes(self)
    }
}
impl<'a> IntoArg<'a> for &'a Vec<u8> {
    fn arg(self) -> Arg<'a> {
        Arg::Bytes(self)
    }
}
impl<'a> IntoArg<'a> for &'a Option<Vec<u8>> {
    fn arg(self) -> Arg<'a> {
        self.as_deref().map_or(Arg::Null, Arg::Bytes)
    }
}
impl<'a> IntoArg<'a> for &'a Vec<i64> {
    fn arg(self) -> Arg<'a> {
        Arg::Ints(self)
    }
}
impl<'a> IntoArg<'a> for &'a [String] {
    fn arg(self) -> Arg<'a> {
        Arg::Texts(self)
    }
}
impl<'a> IntoArg<'a> for &'a Vec<String> {
    fn arg(self) -> Arg<'a> {
        Arg::Texts(self)
    }
}

/// A statement's arguments: `args![a, &b, …]`, each anything [`IntoArg`] takes.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &[$($crate::db::IntoArg::arg($a)),*][..]
    };
}
pub(crate) use args;

/// A value read from a row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Val {
    /// SQL NULL.
    Null,
    /// An integer or a boolean (as 0 or 1).
    Int(i64),
    /// A floating-point number.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
}

/// A row of a result, read by column position. A column read as the wrong kind is
/// a bug in the SQL next to the read, so it panics naming both.
#[derive(Debug)]
pub(crate) struct Row(pub(crate) Vec<Val>);

impl Row {
    fn at(&self, i: usize) -> &Val {
        &self.0[i]
    }

    fn wrong(&self, i: usize, want: &str) -> ! {
        panic!("column {i} read as {want}: {:?}", self.0[i])
    }

    /// An integer column.
    pub(crate) fn i64(&self, i: usize) -> i64 {
        self.opt_i64(i).unwrap_or_else(|| self.wrong(i, "integer"))
    }

    /// An integer column that may be NULL.
    pub(crate) fn opt_i64(&self, i: usize) -> Option<i64> {
        match self.at(i) {
            Val::Int(v) => Some(*v),
            Val::Null => None,
            _ => self.wrong(i, "integer"),
        }
    }

    /// A count or index column.
    pub(crate) fn u64(&self, i: usize) -> u64 {
        self.i64(i).max(0) as u64
    }

    /// A small count column.
    pub(crate) fn u32(&self, i: usize) -> u32 {
        u32::try_from(self.i64(i).max(0)).unwrap_or(u32::MAX)
    }

    /// A boolean column (or expression).
    pub(crate) fn bool(&self, i: usize) -> bool {
        self.i64(i) != 0
    }

    /// A number column (an integer reads as its value).
    pub(crate) fn f64(&self, i: usize) -> f64 {
        self.opt_f64(i).unwrap_or_else(|| self.wrong(i, "number"))
    }

    /// A number column that may be NULL.
    pub(crate) fn opt_f64(&self, i: usize) -> Option<f64> {
        match self.at(i) {
            Val::Real(v) => Some(*v),
            Val::Int(v) => Some(*v as f64),
            Val::Null => None,
            _ => self.wrong(i, "number"),
        }
    }

    /// A text column.
    pub(crate) fn str(&self, i: usize) -> &str {
        match self.at(i) {
            Val::Text(s) => s,
            _ => self.wrong(i, "text"),
        }
    }

    /// A text column, owned.
    pub(crate) fn string(&self, i: usize) -> String {
        self.str(i).to_string()
    }

    /// A text column that may be NULL.
    pub(crate) fn opt_string(&self, i: usize) -> Option<String> {
        match self.at(i) {
            Val::Null => None,
            _ => Some(self.string(i)),
        }
    }

    /// A bytes column; NULL reads as empty.
    pub(crate) fn bytes(&self, i: usize) -> Vec<u8> {
        match self.at(i) {
            Val::Bytes(b) => b.clone(),
            Val::Text(s) => s.clone().into_bytes(),
            Val::Null => Vec::new(),
            _ => self.wrong(i, "bytes"),
        }
    }
}

/// One open transaction of a backend: every transition runs through this.
pub(crate) trait Db {
    /// Runs a statement, returning its rows.
    fn query(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>>;
    /// Runs a statement, returning how many rows it changed.
    fn execute(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64>;
    /// Runs a write whose result nobody reads; a backend may send it with the next
    /// statement or the commit (its errors then surface there).
    fn defer(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<()> {
        self.execute(sql, args).map(drop)
    }
    /// Wakes idle workers once this transaction commits (where the backend can).
    fn notify(&mut self) -> Result<()>;
    /// A time of this host's clock on the database's: leases are written and judged
    /// there, so hosts whose clocks disagree do not expire each other's leases.
    fn lease_clock(&self, local_ms: i64) -> i64;
    /// The deadline plans this connection keeps (see `ops::Plans`).
    fn plans(&mut self) -> &mut crate::ops::Plans;

    /// Runs a statement that yields exactly one row.
    fn query_one(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Row> {
        self.query_opt(sql, args)?
            .ok_or_else(|| unexpected_rows(0, sql))
    }

    /// Runs a statement that yields at most one row (more is an error, as on
    /// PostgreSQL's client: the SQL next to the call is wrong).
    fn query_opt(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>> {
        let mut rows = self.query(sql, args)?;
        if rows.len() > 1 {
            return Err(unexpected_rows(rows.len(), sql));
        }
        Ok(rows.pop())
    }
}

fn unexpected_rows(got: usize, sql: &str) -> StoreError {
    StoreError::Corrupt(format!(
        "expected one row, got {got}: {}",
        sql.split_whitespace().collect::<Vec<_>>().join(" ")
    ))
}

/// PostgreSQL's SQL as SQLite says it: `?N` for `$N`, row locks dropped (the
/// transaction holds the database's write lock), `= ANY($n)` over a JSON array
/// (how [`Arg::Ints`] and [`Arg::Texts`] are bound there), casts dropped, no
/// fragment ids taken ahead (NULL for the fragments sequence).
pub(crate) fn sqlite_dialect(sql: &str) -> String {
    let mut out = sql.replace(" = ANY($", " IN (SELECT value FROM json_each($");
    // Close the json_each( … ) the line above opened: `$N)` becomes `$N))`.
    let mut fixed = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("json_each($") {
        let (head, tail) = rest.split_at(at + "json_each($".len());
        fixed.push_str(head);
        let digits = tail.chars().take_while(|c| c.is_ascii_digit()).count();
        fixed.push_str(&tail[..digits]);
        fixed.push(')');
        rest = &tail[digits..];
    }
    fixed.push_str(rest);
    out = fixed;
    out = without_locks(&out);
    // Ids come from the insert (an INTEGER PRIMARY KEY given NULL), not ahead.
    out = out.replace("nextval('fragments_id_seq')", "NULL");
    for cast in ["::BIGINT", "::DOUBLE PRECISION", "::TEXT", "::INT"] {
        out = out.replace(cast, "");
    }
    out.replace('$', "?")
}

/// `sql` without its row-locking clauses: ` FOR UPDATE`, then ` OF name` and
/// ` SKIP LOCKED` if they follow.
fn without_locks(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(at) = rest.find(" FOR UPDATE") {
        out.push_str(&rest[..at]);
        rest = &rest[at + " FOR UPDATE".len()..];
        if let Some(after) = rest.strip_prefix(" OF ") {
            let name = after
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            rest = &after[name..];
        }
        rest = rest.strip_prefix(" SKIP LOCKED").unwrap_or(rest);
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_sql_reads_as_sqlite() {
        assert_eq!(
            sqlite_dialect(
                "SELECT id FROM f WHERE worker = ANY($2) AND n < $10\n FOR UPDATE OF f SKIP LOCKED"
            ),
            "SELECT id FROM f WHERE worker IN (SELECT value FROM json_each(?2)) AND n < ?10\n"
        );
        assert_eq!(
            sqlite_dialect("SELECT coalesce(sum(n), 0)::BIGINT, $1::TEXT IS NULL FOR UPDATE"),
            "SELECT coalesce(sum(n), 0), ?1 IS NULL"
        );
        assert_eq!(
            sqlite_dialect(
                "SELECT (SELECT s FROM t l FOR UPDATE SKIP LOCKED), x FROM p FOR UPDATE OF p_2"
            ),
            "SELECT (SELECT s FROM t l), x FROM p"
        );
        assert_eq!(
            sqlite_dialect("SELECT (SELECT nextval('fragments_id_seq'))::BIGINT"),
            "SELECT (SELECT NULL)"
        );
    }
}
