//! The rules-engine SQL dialect: `SELECT <items> FROM "<topic filter>" [WHERE <condition>]`.
//!
//! A rule's SQL is parsed once, with sqlparser, and rewritten into plain DataFusion SQL over a
//! virtual row:
//! - every bare identifier (`temperature`, `items.temperature.value`) becomes one column holding
//!   that payload path, so a rule only pays for the paths it references;
//! - the platform functions become metadata columns (`deviceName()` -> `__deviceName`) or the
//!   UDFs of [`super::functions`] (`topic(2)`, `timestamp('yyyy')`, `newuuid()`).
//!
//! The rewritten expressions are planned per payload-type variant by [`super::compile`].

use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, ObjectName,
    ObjectNamePart, SelectItem, SetExpr, Statement, TableFactor, Value,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use std::ops::ControlFlow;

use super::topic::TopicFilter;

/// A metadata column: a fact about the message rather than its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Meta {
    Topic,
    ProductKey,
    DeviceName,
    MessageId,
    TraceId,
    Timestamp,
    Payload,
    TenantId,
    InstanceId,
}

impl Meta {
    /// The column name the rewritten SQL uses.
    pub fn column(self) -> &'static str {
        match self {
            Meta::Topic => "__topic",
            Meta::ProductKey => "__productKey",
            Meta::DeviceName => "__deviceName",
            Meta::MessageId => "__messageId",
            Meta::TraceId => "__traceId",
            Meta::Timestamp => "__timestamp",
            Meta::Payload => "__payload",
            Meta::TenantId => "__tenantId",
            Meta::InstanceId => "__instanceId",
        }
    }
}

/// One item of the SELECT list.
#[derive(Clone, Debug)]
pub enum Item {
    /// `*`: every field of the payload object.
    Wildcard,
    /// A bare payload path: its JSON value is copied as is (objects and arrays included).
    Path { key: String, path: usize },
    /// Any other expression, evaluated by DataFusion.
    Expr { key: String, expr: Box<Expr> },
}

/// A payload path referenced by the rule, e.g. `items.temperature.value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRef {
    /// The JSON object keys to walk.
    pub segments: Vec<String>,
    /// Its column name in the rewritten SQL (unique within the rule).
    pub column: String,
}

/// A parsed and rewritten rule.
#[derive(Clone, Debug)]
pub struct ParsedSql {
    pub filter: TopicFilter,
    pub items: Vec<Item>,
    pub predicate: Option<Expr>,
    pub paths: Vec<PathRef>,
    /// Metadata columns referenced, sorted, without duplicates.
    pub meta: Vec<Meta>,
}

/// A SQL error with its position in the SQL text when the parser gives one (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlError {
    pub message: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl SqlError {
    fn new(message: impl Into<String>) -> SqlError {
        SqlError {
            message: message.into(),
            line: None,
            column: None,
        }
    }
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Parses and rewrites one rule's SQL. `rule_name` is what `ruleName()` returns.
pub fn parse(sql: &str, rule_name: &str) -> Result<ParsedSql, SqlError> {
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql).map_err(parser_error)?;
    if statements.len() != 1 {
        return Err(SqlError::new(format!(
            "a rule holds exactly one SELECT statement, found {}",
            statements.len()
        )));
    }
    let Statement::Query(query) = statements.remove(0) else {
        return Err(SqlError::new("a rule's SQL must be a SELECT statement"));
    };
    let query = *query;
    if query.with.is_some() {
        return Err(SqlError::new("WITH is not supported in rules"));
    }
    if query.order_by.is_some() || query.limit_clause.is_some() || query.fetch.is_some() {
        return Err(SqlError::new(
            "ORDER BY, LIMIT and FETCH are not supported: a rule sees one message at a time",
        ));
    }
    let SetExpr::Select(select) = *query.body else {
        return Err(SqlError::new(
            "a rule's SQL must be a single SELECT (no UNION, VALUES or subquery)",
        ));
    };
    let select = *select;
    if select.distinct.is_some() {
        return Err(SqlError::new("DISTINCT is not supported in rules"));
    }
    if !matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
        || select.having.is_some()
    {
        return Err(SqlError::new(
            "GROUP BY and HAVING are not supported: a rule sees one message at a time",
        ));
    }
    let filter = topic_filter(&select.from)?;

    let mut rewriter = Rewriter {
        rule_name,
        paths: Vec::new(),
        meta: Vec::new(),
        error: None,
    };
    let mut items = Vec::with_capacity(select.projection.len());
    let mut keys: Vec<String> = Vec::new();
    for item in select.projection {
        let (key, expr) = match item {
            SelectItem::Wildcard(_) => {
                items.push(Item::Wildcard);
                continue;
            }
            SelectItem::UnnamedExpr(expr) => (default_key(&expr), expr),
            SelectItem::ExprWithAlias { expr, alias } => (alias.value, expr),
            other => {
                return Err(SqlError::new(format!("unsupported select item: {other}")));
            }
        };
        if keys.contains(&key) {
            return Err(SqlError::new(format!(
                "the output key {key:?} appears twice in SELECT; give one of them another alias"
            )));
        }
        keys.push(key.clone());
        let item = match path_segments(&expr) {
            Some(segments) => Item::Path {
                key,
                path: rewriter.path(segments),
            },
            None => Item::Expr {
                key,
                expr: Box::new(rewriter.rewrite(expr)?),
            },
        };
        items.push(item);
    }
    if items.is_empty() {
        return Err(SqlError::new("SELECT needs at least one item"));
    }
    let predicate = select.selection.map(|e| rewriter.rewrite(e)).transpose()?;
    let mut meta = rewriter.meta;
    meta.sort();
    meta.dedup();
    Ok(ParsedSql {
        filter,
        items,
        predicate,
        paths: rewriter.paths,
        meta,
    })
}

/// The output key of an unaliased select item: a path's own dotted name, else the SQL text.
fn default_key(expr: &Expr) -> String {
    match path_segments(expr) {
        Some(segments) => segments.join("."),
        None => expr.to_string(),
    }
}

fn path_segments(expr: &Expr) -> Option<Vec<String>> {
    match expr {
        Expr::Identifier(id) => Some(vec![id.value.clone()]),
        Expr::CompoundIdentifier(ids) => Some(ids.iter().map(|i| i.value.clone()).collect()),
        // SQL keywords that parse as functions without parentheses (`user`, `session_user`)
        // are payload fields in this dialect; only the clock ones stay functions (refused
        // later, like now()).
        Expr::Function(f) if matches!(f.args, FunctionArguments::None) => match f.name.0.as_slice()
        {
            [ObjectNamePart::Identifier(id)]
                if !id.value.to_ascii_lowercase().starts_with("current_") =>
            {
                Some(vec![id.value.clone()])
            }
            _ => None,
        },
        _ => None,
    }
}

fn topic_filter(from: &[ast::TableWithJoins]) -> Result<TopicFilter, SqlError> {
    let [table] = from else {
        return Err(SqlError::new(
            "FROM must name exactly one topic filter, e.g. FROM \"/pk/+/user/update\"",
        ));
    };
    if !table.joins.is_empty() {
        return Err(SqlError::new("JOIN is not supported in rules"));
    }
    let TableFactor::Table { name, .. } = &table.relation else {
        return Err(SqlError::new(
            "FROM must be a quoted topic filter, e.g. FROM \"/pk/+/user/update\"",
        ));
    };
    let ObjectName(parts) = name;
    let text = match parts.as_slice() {
        [ObjectNamePart::Identifier(id)] if id.quote_style.is_some() => id.value.clone(),
        _ => {
            return Err(SqlError::new(format!(
                "FROM must be a quoted topic filter such as \"/pk/+/user/update\", found {name}"
            )));
        }
    };
    TopicFilter::parse(&text).map_err(|e| SqlError::new(format!("topic filter in FROM: {e}")))
}

/// Converts sqlparser's "... at Line: 3, Column: 7" into a positioned error.
fn parser_error(e: datafusion::sql::sqlparser::parser::ParserError) -> SqlError {
    let text = e.to_string();
    let text = text
        .strip_prefix("sql parser error: ")
        .unwrap_or(&text)
        .to_owned();
    let number_after = |tag: &str| -> Option<usize> {
        let start = text.rfind(tag)? + tag.len();
        text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    SqlError {
        line: number_after("Line: "),
        column: number_after("Column: "),
        message: text.clone(),
    }
}

struct Rewriter<'a> {
    rule_name: &'a str,
    paths: Vec<PathRef>,
    meta: Vec<Meta>,
    error: Option<SqlError>,
}

impl Rewriter<'_> {
    /// The index of a payload path, registering it on first use.
    fn path(&mut self, segments: Vec<String>) -> usize {
        if let Some(i) = self.paths.iter().position(|p| p.segments == segments) {
            return i;
        }
        let mut column = segments.join(".");
        if self.paths.iter().any(|p| p.column == column) || column.starts_with("__") {
            column = format!("{column}#{}", self.paths.len());
        }
        self.paths.push(PathRef { segments, column });
        self.paths.len() - 1
    }

    fn meta_column(&mut self, meta: Meta) -> Expr {
        self.meta.push(meta);
        Expr::Identifier(Ident::with_quote('"', meta.column()))
    }

    fn rewrite(&mut self, mut expr: Expr) -> Result<Expr, SqlError> {
        let _ = ast::visit_expressions_mut(&mut expr, |e| {
            if self.error.is_none()
                && let Err(err) = self.rewrite_one(e)
            {
                self.error = Some(err);
            }
            ControlFlow::<()>::Continue(())
        });
        match self.error.take() {
            Some(err) => Err(err),
            None => Ok(expr),
        }
    }

    /// Rewrites one node; children were already rewritten (the visit is post-order).
    fn rewrite_one(&mut self, e: &mut Expr) -> Result<(), SqlError> {
        if let Some(segments) = path_segments(e) {
            let i = self.path(segments);
            *e = Expr::Identifier(Ident::with_quote('"', self.paths[i].column.clone()));
            return Ok(());
        }
        let Expr::Function(f) = e else { return Ok(()) };
        let [ObjectNamePart::Identifier(name)] = f.name.0.as_slice() else {
            return Ok(());
        };
        let name = name.value.to_ascii_lowercase();

        let args = match &f.args {
            FunctionArguments::None => Vec::new(),
            FunctionArguments::List(list) => list
                .args
                .iter()
                .map(|a| match a {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(x)) => Some(x.clone()),
                    _ => None,
                })
                .collect(),
            FunctionArguments::Subquery(_) => return Ok(()),
        };
        let meta = match name.as_str() {
            "devicename" => Some(Meta::DeviceName),
            "productkey" => Some(Meta::ProductKey),
            "messageid" => Some(Meta::MessageId),
            "traceid" => Some(Meta::TraceId),
            "payload" => Some(Meta::Payload),
            "tenantid" => Some(Meta::TenantId),
            "instanceid" => Some(Meta::InstanceId),
            _ => None,
        };
        let arity = |n: usize| -> Result<Vec<Expr>, SqlError> {
            if args.len() > n || args.iter().any(Option::is_none) {
                Err(SqlError::new(format!(
                    "{}() takes {} argument{}, got {}",
                    f.name,
                    if n == 0 {
                        "no".to_owned()
                    } else {
                        format!("at most {n}")
                    },
                    if n == 1 { "" } else { "s" },
                    args.len()
                )))
            } else {
                Ok(args.iter().flatten().cloned().collect())
            }
        };
        if let Some(meta) = meta {
            arity(0)?;
            *e = self.meta_column(meta);
            return Ok(());
        }
        match name.as_str() {
            "topic" => {
                let args = arity(1)?;
                let topic = self.meta_column(Meta::Topic);
                *e = match args.into_iter().next() {
                    None => topic,
                    Some(n) => call(super::functions::TOPIC_LEVEL, vec![topic, n]),
                };
            }
            "timestamp" => {
                let args = arity(1)?;
                let ts = self.meta_column(Meta::Timestamp);
                *e = match args.into_iter().next() {
                    None => ts,
                    Some(fmt) => call(super::functions::FORMAT_TIMESTAMP, vec![ts, fmt]),
                };
            }
            "newuuid" => {
                arity(0)?;
                *e = call(super::functions::NEW_UUID, Vec::new());
            }
            "now" | "current_timestamp" | "current_date" | "current_time" => {
                return Err(SqlError::new(format!(
                    "{}() is not supported in rules: a compiled rule would freeze it at load \
                     time; use timestamp() (the message time)",
                    f.name
                )));
            }
            "rulename" => {
                arity(0)?;
                *e = Expr::value(Value::SingleQuotedString(self.rule_name.to_owned()));
            }
            _ => {}
        }
        Ok(())
    }
}

fn call(name: &str, args: Vec<Expr>) -> Expr {
    Expr::Function(ast::Function {
        name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(ast::FunctionArgumentList {
            duplicate_treatment: None,
            args: args
                .into_iter()
                .map(|a| FunctionArg::Unnamed(FunctionArgExpr::Expr(a)))
                .collect(),
            clauses: Vec::new(),
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_filter_paths_and_functions() {
        let p = parse(
            "SELECT deviceName() AS device, items.temperature.value AS t, topic(2), \
             timestamp('yyyy') AS y FROM \"/a1/+/thing/event/property/post\" \
             WHERE items.temperature.value > 38",
            "r1",
        )
        .unwrap();
        assert_eq!(p.filter.as_str(), "/a1/+/thing/event/property/post");
        assert_eq!(p.paths.len(), 1, "the shared path is registered once");
        assert_eq!(p.paths[0].segments, ["items", "temperature", "value"]);
        assert_eq!(p.meta, [Meta::Topic, Meta::DeviceName, Meta::Timestamp]);
        let keys: Vec<String> = p
            .items
            .iter()
            .map(|i| match i {
                Item::Path { key, .. } | Item::Expr { key, .. } => key.clone(),
                Item::Wildcard => "*".into(),
            })
            .collect();
        assert_eq!(keys, ["device", "t", "topic(2)", "y"]);
    }

    #[test]
    fn errors_carry_positions() {
        let e = parse("SELECT a FROM \"/a/b\"\nWHERE a > > 3", "r").unwrap_err();
        assert_eq!((e.line, e.column), (Some(2), Some(11)), "{e:?}");
        let e = parse("SELECT a FROM b", "r").unwrap_err();
        assert!(e.message.contains("quoted topic filter"), "{e:?}");
        let e = parse("SELECT a, b AS a FROM \"/x/y\"", "r").unwrap_err();
        assert!(e.message.contains("twice"), "{e:?}");
        let e = parse("SELECT deviceName(1) FROM \"/x/y\"", "r").unwrap_err();
        assert!(e.message.contains("no argument"), "{e:?}");
    }

    #[test]
    fn rule_name_is_a_literal() {
        let p = parse("SELECT ruleName() AS r FROM \"/x/y\"", "overheat").unwrap();
        let Item::Expr { expr, .. } = &p.items[0] else {
            panic!()
        };
        assert_eq!(expr.to_string(), "'overheat'");
    }
}
