//! Hand-written statements that each pooled connection prepares once.
//! diesel treats every `sql_query` as dynamic text and never caches it, so
//! PostgreSQL parsed and planned the pipeline's statements (apply, outbox,
//! relay) on every call; planning the apply statement cost about as much as
//! running it. A [`Prepared`] statement is fixed text whose binds are
//! written `$1`, `$2`, … once each and in order: diesel keys its statement
//! cache by that text, and PostgreSQL plans it from its plan cache.

use std::marker::PhantomData;

use diesel::QueryResult;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};

/// A statement of fixed text and its binds, run like `sql_query`'s.
pub(crate) struct Prepared<B = ()> {
    sql: &'static str,
    binds: B,
}

/// One bind value and the SQL type it is sent as.
pub(crate) struct Bind<ST, V> {
    value: V,
    /// `fn() -> ST` keeps the statement `Send` whatever the marker type.
    sql_type: PhantomData<fn() -> ST>,
}

/// A statement with no binds yet.
pub(crate) fn prepared(sql: &'static str) -> Prepared {
    Prepared { sql, binds: () }
}

impl<B: Binds> Prepared<B> {
    /// Binds the next placeholder (`$1` first).
    pub(crate) fn bind<ST, V>(self, value: V) -> Prepared<(B, Bind<ST, V>)> {
        Prepared {
            sql: self.sql,
            binds: (
                self.binds,
                Bind {
                    value,
                    sql_type: PhantomData,
                },
            ),
        }
    }
}

/// The binds so far, as a list built one `bind` at a time.
pub(crate) trait Binds {
    const COUNT: usize;
    /// Writes the text before each bind, the bind, and the text after the
    /// last one.
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>, text: &[&str]) -> QueryResult<()>;
}

impl Binds for () {
    const COUNT: usize = 0;
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>, text: &[&str]) -> QueryResult<()> {
        out.push_sql(text.first().copied().unwrap_or_default());
        Ok(())
    }
}

impl<P, ST, V> Binds for (P, Bind<ST, V>)
where
    P: Binds,
    Pg: HasSqlType<ST>,
    V: ToSql<ST, Pg>,
{
    const COUNT: usize = P::COUNT + 1;
    fn walk<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>, text: &[&str]) -> QueryResult<()> {
        self.0.walk(out, text)?;
        // The query builder writes the placeholder `$n` itself.
        out.push_bind_param::<ST, V>(&self.1.value)?;
        out.push_sql(text.get(Self::COUNT).copied().unwrap_or_default());
        Ok(())
    }
}

/// The text around the placeholders `$1` … `$count`, which must each appear
/// once and in order, so that the builder writes back the very same text.
fn split(sql: &str, count: usize) -> QueryResult<Vec<&str>> {
    let bytes = sql.as_bytes();
    let (mut text, mut start, mut i) = (Vec::with_capacity(count + 1), 0, 0);
    while i < bytes.len() {
        if bytes[i] != b'$' {
            i += 1;
            continue;
        }
        let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            i += 1;
            continue;
        }
        let n: usize = sql[i + 1..i + 1 + digits].parse().unwrap_or(0);
        if n != text.len() + 1 {
            return Err(misplaced(sql));
        }
        text.push(&sql[start..i]);
        i += 1 + digits;
        start = i;
    }
    text.push(&sql[start..]);
    if text.len() != count + 1 {
        return Err(misplaced(sql));
    }
    Ok(text)
}

fn misplaced(sql: &str) -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError(
        format!("a prepared statement's binds must be $1, $2, … once each, in order, one per bind: {sql}").into(),
    )
}

impl<B: Binds> QueryFragment<Pg> for Prepared<B> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let text = split(self.sql, B::COUNT)?;
        self.binds.walk(&mut out, &text)
    }
}

impl<B> QueryId for Prepared<B> {
    type QueryId = ();
    // Keyed by its text (and bind types) in the connection's cache.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<B> Query for Prepared<B> {
    type SqlType = Untyped;
}

#[cfg(test)]
mod tests {
    use diesel::debug_query;
    use diesel::sql_types::{Array, BigInt, Text};

    use super::*;

    #[test]
    fn a_prepared_statement_is_sent_as_written() {
        let sql = "SELECT $1::int8 AS a, x FROM t WHERE y = ANY($2) AND z = $3";
        let q = prepared(sql)
            .bind::<BigInt, _>(7i64)
            .bind::<Array<BigInt>, _>(vec![1i64, 2])
            .bind::<Text, _>("z");
        let shown = debug_query::<Pg, _>(&q).to_string();
        assert!(shown.starts_with(sql), "{shown}");
        assert!(shown.contains(r#"binds: [7, [1, 2], "z"]"#), "{shown}");
        assert!(
            q.is_safe_to_cache_prepared(&Pg).unwrap(),
            "its text is fixed, so it is cached"
        );
    }

    #[test]
    fn binds_out_of_order_or_miscounted_are_an_error() {
        assert!(split("SELECT $2, $1", 2).is_err());
        assert!(split("SELECT $1, $1", 2).is_err());
        assert!(split("SELECT $1", 2).is_err());
        assert!(split("SELECT $1, $2", 1).is_err());
        assert_eq!(split("SELECT '$', $1 $", 1).unwrap(), vec!["SELECT '$', ", " $"]);
        assert_eq!(split("SELECT 1", 0).unwrap(), vec!["SELECT 1"]);
    }
}
