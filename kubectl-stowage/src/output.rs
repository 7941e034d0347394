use serde::Serialize;

use crate::PluginError;
use crate::cli::Format;

/// Prints `value` as JSON or YAML, or as the table `table` makes of it.
pub fn print<T: Serialize + ?Sized>(
    value: &T,
    format: Format,
    table: fn(&T) -> String,
) -> Result<(), PluginError> {
    let text = match format {
        Format::Table => table(value),
        Format::Json => {
            serde_json::to_string_pretty(value).map_err(|e| PluginError::Output(e.to_string()))?
                + "\n"
        }
        Format::Yaml => {
            serde_yaml::to_string(value).map_err(|e| PluginError::Output(e.to_string()))?
        }
    };
    print!("{}", terminal_safe(&text));
    Ok(())
}

/// Text from the cluster (a command's stderr in a status, snapshot tags, host names) is written by
/// pods and tenants: escape characters a terminal would act on (ESC sequences that move the cursor,
/// rewrite the title or hide what follows), keeping newlines and tabs. `\x1b` is shown as `\u{1b}`.
pub fn terminal_safe(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
pub fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// "-" for what is not known.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_text_kept() {
        assert_eq!(
            terminal_safe("ok\x1b]0;owned\x07\r\n\tnext \u{9b}2J é"),
            "ok\\u{1b}]0;owned\\u{7}\\u{d}\n\tnext \\u{9b}2J é"
        );
    }

    #[test]
    fn columns_line_up() {
        let t = super::columns(&["A", "LONGER"], &[vec!["wide-cell".into(), "x".into()]]);
        assert_eq!(t, "A           LONGER\nwide-cell   x\n");
    }
}
