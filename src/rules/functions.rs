//! The platform functions that need code at run time, as DataFusion scalar UDFs.
//!
//! The other platform functions (`deviceName()`, `topic()`, `timestamp()`, ...) are plain
//! metadata columns; see [`super::sql`]. The UDF names start with `iot_` so they never shadow a
//! DataFusion built-in.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// `topic(n)`: the n-th topic level (1-based); NULL past the last level; n < 1 is an error.
pub const TOPIC_LEVEL: &str = "iot_topic_level";
/// `timestamp('yyyy-MM-dd HH:mm:ss')`: the message time formatted with a Java-style pattern, UTC.
pub const FORMAT_TIMESTAMP: &str = "iot_format_timestamp";
/// `newuuid()`: a random UUID per row.
pub const NEW_UUID: &str = "iot_newuuid";

/// Every UDF, for registration in the engine's session.
pub fn all() -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::from(TopicLevel::new()),
        ScalarUDF::from(FormatTimestamp::new()),
        ScalarUDF::from(NewUuid::new()),
    ]
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct TopicLevel {
    signature: Signature,
}

impl TopicLevel {
    fn new() -> Self {
        TopicLevel {
            signature: Signature::exact(
                vec![DataType::Utf8, DataType::Int64],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for TopicLevel {
    fn name(&self) -> &str {
        TOPIC_LEVEL
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let topics = arrays[0].as_string::<i32>();
        let levels = arrays[1].as_primitive::<Int64Type>();
        let mut out = StringBuilder::with_capacity(rows, rows * 8);
        for i in 0..rows {
            if topics.is_null(i) || levels.is_null(i) {
                out.append_null();
                continue;
            }
            let n = levels.value(i);
            if n < 1 {
                return exec_err!("topic(n) takes a level of 1 or more, got {n}");
            }
            out.append_option(crate::rules::topic::topic_level(
                topics.value(i),
                n as usize,
            ));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct FormatTimestamp {
    signature: Signature,
}

impl FormatTimestamp {
    fn new() -> Self {
        FormatTimestamp {
            signature: Signature::exact(
                vec![DataType::Int64, DataType::Utf8],
                Volatility::Immutable,
            ),
        }
    }
}

impl ScalarUDFImpl for FormatTimestamp {
    fn name(&self) -> &str {
        FORMAT_TIMESTAMP
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        // The pattern is nearly always a literal: translate it once for the whole batch.
        let constant = match &args.args[1] {
            ColumnarValue::Scalar(ScalarValue::Utf8(Some(p))) => Some(java_pattern_to_chrono(p)?),
            _ => None,
        };
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let times = arrays[0].as_primitive::<Int64Type>();
        let patterns = arrays[1].as_string::<i32>();
        let mut out = StringBuilder::with_capacity(rows, rows * 20);
        for i in 0..rows {
            if times.is_null(i) || patterns.is_null(i) {
                out.append_null();
                continue;
            }
            let pattern = match &constant {
                Some(p) => p.clone(),
                None => java_pattern_to_chrono(patterns.value(i))?,
            };
            let Some(t) = chrono::DateTime::from_timestamp_millis(times.value(i)) else {
                return exec_err!("timestamp {} ms is out of range", times.value(i));
            };
            out.append_value(t.format(&pattern).to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
    }
}

/// Translates a Java `SimpleDateFormat`-style pattern (as the platform's `timestamp(format)`
/// takes) into a chrono format string. Supported letters: `yyyy yy MM M dd d HH H hh h mm m ss s
/// SSS a EEE Z`; text in single quotes is literal; other letters are an error.
pub fn java_pattern_to_chrono(pattern: &str) -> Result<String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() * 2);
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            let end = chars[i + 1..]
                .iter()
                .position(|&x| x == '\'')
                .map(|p| i + 1 + p);
            let Some(end) = end else {
                return exec_err!("timestamp format {pattern:?}: unterminated quote");
            };
            if end == i + 1 {
                out.push('\'');
            }
            for &l in &chars[i + 1..end] {
                push_literal(&mut out, l);
            }
            i = end + 1;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            push_literal(&mut out, c);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|&&x| x == c).count();
        let spec = match (c, run) {
            ('y', 4) => "%Y",
            ('y', 2) => "%y",
            ('M', 2) => "%m",
            ('M', 1) => "%-m",
            ('d', 2) => "%d",
            ('d', 1) => "%-d",
            ('H', 2) => "%H",
            ('H', 1) => "%-H",
            ('h', 2) => "%I",
            ('h', 1) => "%-I",
            ('m', 2) => "%M",
            ('m', 1) => "%-M",
            ('s', 2) => "%S",
            ('s', 1) => "%-S",
            ('S', 3) => "%3f",
            ('a', 1) => "%p",
            ('E', 3) => "%a",
            ('Z', 1) => "%z",
            _ => {
                return Err(DataFusionError::Execution(format!(
                    "timestamp format {pattern:?}: unsupported pattern {:?} (supported: yyyy yy \
                     MM M dd d HH H hh h mm m ss s SSS a EEE Z, text in single quotes)",
                    chars[i..i + run].iter().collect::<String>()
                )));
            }
        };
        out.push_str(spec);
        i += run;
    }
    Ok(out)
}

fn push_literal(out: &mut String, c: char) {
    if c == '%' {
        out.push_str("%%");
    } else {
        out.push(c);
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct NewUuid {
    signature: Signature,
}

impl NewUuid {
    fn new() -> Self {
        NewUuid {
            signature: Signature::nullary(Volatility::Volatile),
        }
    }
}

impl ScalarUDFImpl for NewUuid {
    fn name(&self) -> &str {
        NEW_UUID
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let mut out = StringBuilder::with_capacity(rows, rows * 36);
        for _ in 0..rows {
            out.append_value(uuid::Uuid::new_v4().hyphenated().to_string());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish()) as ArrayRef))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_patterns() {
        assert_eq!(
            java_pattern_to_chrono("yyyy-MM-dd HH:mm:ss").unwrap(),
            "%Y-%m-%d %H:%M:%S"
        );
        assert_eq!(
            java_pattern_to_chrono("HH:mm:ss.SSS").unwrap(),
            "%H:%M:%S.%3f"
        );
        assert_eq!(
            java_pattern_to_chrono("yyyy'T'MM 100%").unwrap(),
            "%YT%m 100%%"
        );
        assert!(java_pattern_to_chrono("qqq").is_err());
        assert!(java_pattern_to_chrono("yyyy'T").is_err());
    }
}
