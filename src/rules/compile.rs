//! Compiling a parsed rule into DataFusion physical expressions.
//!
//! JSON is dynamically typed and Arrow is not: `temperature` may arrive as 38, 38.5 or "38". A
//! rule is therefore compiled once per *type variant*: the JSON kind of each payload path it
//! references. A stream of one product's messages has one or two variants, each compiled on its
//! first sight and then re-run on every batch; nothing is planned per message or per batch.
//! Grouping a batch by variant keeps batch evaluation exactly equal to evaluating each message on
//! its own (an integer stays an integer; `5 / 2` is 2 whatever else is in the batch).

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, Float64Builder, Int64Builder, NullArray,
    StringBuilder,
};
use datafusion::arrow::compute::{filter_record_batch, prep_null_mask_filter};
use datafusion::arrow::datatypes::{self as arrow_types, DataType, Schema, SchemaRef};
use datafusion::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::common::DFSchema;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, ExprWithAlias};

use super::sql::{Item, Meta, ParsedSql};
use crate::message::Message;

/// The JSON kind of one payload path in one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Absent, or JSON null.
    Null,
    Bool,
    /// A JSON number that fits i64.
    Int,
    /// Any other JSON number.
    Float,
    Str,
    /// An object or array, seen by SQL as its compact JSON text.
    Json,
}

/// One payload path's value in one message, decoded for the columns (src/engine/decode.rs
/// decodes only the paths a rule references).
#[derive(Clone, Debug, PartialEq)]
pub enum Field<'a> {
    /// Absent, or JSON null.
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    /// An object or array as its compact JSON text.
    Json(Cow<'a, str>),
}

impl Field<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Field::Null => Kind::Null,
            Field::Bool(_) => Kind::Bool,
            Field::Int(_) => Kind::Int,
            Field::Float(_) => Kind::Float,
            Field::Str(_) => Kind::Str,
            Field::Json(_) => Kind::Json,
        }
    }
}

impl Kind {
    fn data_type(self) -> DataType {
        match self {
            Kind::Null => DataType::Null,
            Kind::Bool => DataType::Boolean,
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Str | Kind::Json => DataType::Utf8,
        }
    }
}

impl Meta {
    fn data_type(self) -> DataType {
        match self {
            Meta::Timestamp => DataType::Int64,
            _ => DataType::Utf8,
        }
    }
}

/// A rule's compiled form: the parsed SQL plus its compiled variants.
pub struct Program {
    pub parsed: ParsedSql,
    variants: Mutex<Vec<(Vec<Kind>, Arc<Variant>)>>,
    max_variants: usize,
}

/// The physical expressions of one type variant.
pub struct Variant {
    schema: SchemaRef,
    predicate: Option<Arc<dyn PhysicalExpr>>,
    /// One per select item; `None` for `*` and bare paths, which copy JSON values directly.
    projections: Vec<Option<Arc<dyn PhysicalExpr>>>,
}

/// Rows that passed WHERE, and each projected column over just those rows.
pub struct VariantOutput {
    pub passed: Vec<usize>,
    pub columns: Vec<Option<ArrayRef>>,
}

impl Program {
    /// Compiles the all-NULL variant up front, so SQL that cannot plan (unknown function, wrong
    /// argument count) is refused at load time rather than on the first message.
    pub fn new(
        parsed: ParsedSql,
        state: &SessionState,
        max_variants: usize,
    ) -> Result<Program, String> {
        let kinds = vec![Kind::Null; parsed.paths.len()];
        let first = Arc::new(Variant::compile(&parsed, &kinds, state)?);
        Ok(Program {
            parsed,
            variants: Mutex::new(vec![(kinds, first)]),
            max_variants: max_variants.max(1),
        })
    }

    /// The variant for `kinds`, compiled on first use. Past `max_variants` a variant is compiled
    /// for this call only and not kept, so memory stays bounded for pathological streams.
    pub fn variant(&self, kinds: &[Kind], state: &SessionState) -> Result<Arc<Variant>, String> {
        {
            let variants = self.variants.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, v)) = variants.iter().find(|(k, _)| k.as_slice() == kinds) {
                return Ok(Arc::clone(v));
            }
        }
        let compiled = Arc::new(Variant::compile(&self.parsed, kinds, state)?);
        let mut variants = self.variants.lock().unwrap_or_else(PoisonError::into_inner);
        if variants.len() < self.max_variants {
            variants.push((kinds.to_vec(), Arc::clone(&compiled)));
        }
        Ok(compiled)
    }

    /// Compiled variants kept.
    pub fn variant_count(&self) -> usize {
        self.variants
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Variant {
    fn compile(
        parsed: &ParsedSql,
        kinds: &[Kind],
        state: &SessionState,
    ) -> Result<Variant, String> {
        let mut fields: Vec<arrow_types::Field> = parsed
            .paths
            .iter()
            .zip(kinds)
            .map(|(p, k)| arrow_types::Field::new(&p.column, k.data_type(), true))
            .collect();
        fields.extend(
            parsed
                .meta
                .iter()
                .map(|m| arrow_types::Field::new(m.column(), m.data_type(), true)),
        );
        let schema = Arc::new(Schema::new(fields));
        let df_schema = DFSchema::try_from(schema.as_ref().clone()).map_err(|e| e.to_string())?;
        let df_schema_ref = Arc::new(df_schema.clone());
        let plan = |expr: &SqlExpr| -> Result<Arc<dyn PhysicalExpr>, String> {
            let logical = state
                .create_logical_expr_from_sql_expr(
                    ExprWithAlias {
                        expr: expr.clone(),
                        alias: None,
                    },
                    &df_schema,
                )
                .map_err(|e| clean_error(&e.to_string()))?;
            // Simplify first: some built-ins (coalesce, nvl) only run in their rewritten form.
            let simplifier = ExprSimplifier::new(
                SimplifyContext::builder()
                    .with_schema(Arc::clone(&df_schema_ref))
                    .with_config_options(Arc::clone(state.config_options()))
                    .build(),
            );
            let logical = simplifier
                .coerce(logical, &df_schema)
                .and_then(|e| simplifier.simplify(e))
                .map_err(|e| clean_error(&e.to_string()))?;
            state
                .create_physical_expr(logical, &df_schema)
                .map_err(|e| clean_error(&e.to_string()))
        };
        let predicate = parsed.predicate.as_ref().map(&plan).transpose()?;
        if let Some(p) = &predicate {
            let t = p.data_type(&schema).map_err(|e| e.to_string())?;
            if !matches!(t, DataType::Boolean | DataType::Null) {
                return Err(format!(
                    "WHERE must be a condition (boolean), but it is {t}"
                ));
            }
        }
        let projections = parsed
            .items
            .iter()
            .map(|item| match item {
                Item::Expr { expr, .. } => plan(expr).map(Some),
                Item::Wildcard | Item::Path { .. } => Ok(None),
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Variant {
            schema,
            predicate,
            projections,
        })
    }

    /// Evaluates WHERE and the projections over `rows` (messages of this variant), where
    /// `values[r * paths + p]` is path `p` of row `r`.
    pub fn run(
        &self,
        parsed: &ParsedSql,
        rows: &[&Message],
        values: &[&Field<'_>],
        kinds: &[Kind],
    ) -> Result<VariantOutput, String> {
        let n = rows.len();
        let paths = parsed.paths.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (p, kind) in kinds.iter().enumerate() {
            let column = (0..n).map(|r| values[r * paths + p]);
            columns.push(build_path_column(*kind, column, n));
        }
        for meta in &parsed.meta {
            columns.push(build_meta_column(*meta, rows));
        }
        let batch = RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(n)),
        )
        .map_err(|e| e.to_string())?;

        let (batch, passed) = match &self.predicate {
            None => (batch, (0..n).collect()),
            Some(predicate) => {
                let mask = predicate
                    .evaluate(&batch)
                    .and_then(|v| v.into_array(n))
                    .map_err(|e| clean_error(&e.to_string()))?;
                let mask = match mask.data_type() {
                    DataType::Boolean => mask
                        .as_any()
                        .downcast_ref::<BooleanArray>()
                        .expect("boolean array")
                        .clone(),
                    // WHERE NULL: no row matches.
                    _ => BooleanArray::from(vec![false; n]),
                };
                let mask = if mask.null_count() > 0 {
                    prep_null_mask_filter(&mask)
                } else {
                    mask
                };
                let passed: Vec<usize> = (0..n).filter(|&i| mask.value(i)).collect();
                if passed.len() == n {
                    (batch, passed)
                } else {
                    let filtered = filter_record_batch(&batch, &mask).map_err(|e| e.to_string())?;
                    (filtered, passed)
                }
            }
        };
        let rows_out = passed.len();
        let columns = if rows_out == 0 {
            vec![None; self.projections.len()]
        } else {
            self.projections
                .iter()
                .map(|p| {
                    p.as_ref()
                        .map(|expr| {
                            expr.evaluate(&batch)
                                .and_then(|v| v.into_array(rows_out))
                                .map_err(|e| clean_error(&e.to_string()))
                        })
                        .transpose()
                })
                .collect::<Result<Vec<_>, String>>()?
        };
        Ok(VariantOutput { passed, columns })
    }
}

fn build_path_column<'a, 'b: 'a>(
    kind: Kind,
    values: impl Iterator<Item = &'a Field<'b>>,
    n: usize,
) -> ArrayRef {
    match kind {
        Kind::Null => Arc::new(NullArray::new(n)),
        Kind::Bool => {
            let mut b = BooleanBuilder::with_capacity(n);
            values.for_each(|v| match v {
                Field::Bool(x) => b.append_value(*x),
                _ => b.append_null(),
            });
            Arc::new(b.finish())
        }
        Kind::Int => {
            let mut b = Int64Builder::with_capacity(n);
            values.for_each(|v| match v {
                Field::Int(x) => b.append_value(*x),
                _ => b.append_null(),
            });
            Arc::new(b.finish())
        }
        Kind::Float => {
            let mut b = Float64Builder::with_capacity(n);
            values.for_each(|v| match v {
                Field::Float(x) => b.append_value(*x),
                _ => b.append_null(),
            });
            Arc::new(b.finish())
        }
        Kind::Str | Kind::Json => {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            values.for_each(|v| match v {
                Field::Str(x) | Field::Json(x) => b.append_value(x),
                _ => b.append_null(),
            });
            Arc::new(b.finish())
        }
    }
}

fn build_meta_column(meta: Meta, rows: &[&Message]) -> ArrayRef {
    if meta == Meta::Timestamp {
        let mut b = Int64Builder::with_capacity(rows.len());
        rows.iter().for_each(|m| b.append_value(m.timestamp_ms));
        return Arc::new(b.finish());
    }
    let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 24);
    for m in rows {
        match meta {
            Meta::Topic => b.append_value(&m.topic),
            Meta::ProductKey => b.append_value(&m.product_key),
            Meta::DeviceName => b.append_value(&m.device_name),
            Meta::MessageId => b.append_value(&m.message_id),
            Meta::TraceId => b.append_value(&m.trace_id),
            Meta::TenantId => b.append_option(m.tenant_id.as_deref()),
            Meta::InstanceId => b.append_option(m.instance_id.as_deref()),
            Meta::Payload => b.append_value(String::from_utf8_lossy(&m.payload)),
            Meta::Timestamp => unreachable!("handled above"),
        }
    }
    Arc::new(b.finish())
}

/// DataFusion errors name our internal columns and UDFs; say them the way the rule wrote them.
pub fn clean_error(text: &str) -> String {
    let mut s = text.to_owned();
    for (internal, public) in [
        (super::functions::TOPIC_LEVEL, "topic"),
        (super::functions::FORMAT_TIMESTAMP, "timestamp"),
        (super::functions::NEW_UUID, "newuuid"),
        ("__topic", "topic()"),
        ("__productKey", "productKey()"),
        ("__deviceName", "deviceName()"),
        ("__messageId", "messageId()"),
        ("__traceId", "traceId()"),
        ("__timestamp", "timestamp()"),
        ("__payload", "payload()"),
        ("__tenantId", "tenantId()"),
        ("__instanceId", "instanceId()"),
    ] {
        s = s.replace(internal, public);
    }
    s.strip_prefix("Execution error: ")
        .map(str::to_owned)
        .unwrap_or(s)
}
