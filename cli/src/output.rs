//! Table and JSON output in zpool's shapes.
//!
//! - [`Table`] renders `zpool list`-style tables: a header line, columns
//!   padded to the widest cell and separated by two spaces, numeric columns
//!   right-aligned; or, scripted (`-H`), no header and one tab between fields.
//! - [`select_columns`] resolves a `-o name,size,...` list.
//! - [`json_envelope`] wraps `-j` output in zpool's `output_version` object.

use serde_json::{json, Map, Value};

/// A table of text cells, rendered as zpool renders its lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    right_align: Vec<bool>,
}

impl Table {
    /// A table with these column headers. `right_align[i]` right-aligns
    /// column `i` (header included), as zpool does for numeric columns;
    /// columns beyond `right_align` are left-aligned.
    pub fn new<S: Into<String>>(
        headers: impl IntoIterator<Item = S>,
        right_align: Vec<bool>,
    ) -> Self {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            right_align,
        }
    }

    /// Appends a row. A short row is rendered as if padded with empty cells;
    /// a long one has its extra cells rendered as further columns.
    pub fn push<S: Into<String>>(&mut self, row: impl IntoIterator<Item = S>) {
        self.rows.push(row.into_iter().map(Into::into).collect());
    }

    /// The number of rows pushed so far.
    #[allow(dead_code)]
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row has been pushed.
    #[allow(dead_code)]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Renders the table; every line ends with `\n`.
    ///
    /// `scripted` (`-H`): no header, the fields of each row joined by a
    /// single tab, nothing padded. Otherwise: the header line then the rows,
    /// each column as wide as its widest cell (in characters), cells joined
    /// by two spaces, right-aligned columns padded on the left, and no
    /// trailing spaces after a left-aligned last column (empty cells at the
    /// end of a line are left out for the same reason).
    pub fn render(&self, scripted: bool) -> String {
        let mut out = String::new();
        if scripted {
            for row in &self.rows {
                out.push_str(&row.join("\t"));
                out.push('\n');
            }
            return out;
        }

        let ncols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain(std::iter::once(self.headers.len()))
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; ncols];
        for line in std::iter::once(&self.headers).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }

        for line in std::iter::once(&self.headers).chain(&self.rows) {
            // Trailing empty cells are left out, so no line ends in blanks.
            let used = line
                .iter()
                .rposition(|c| !c.is_empty())
                .map_or(0, |i| i + 1);
            let mut text = String::new();
            for (i, (cell, &width)) in line.iter().zip(&widths).take(used).enumerate() {
                let pad = width.saturating_sub(cell.chars().count());
                if i > 0 {
                    text.push_str("  ");
                }
                if self.right_align.get(i).copied().unwrap_or(false) {
                    text.extend(std::iter::repeat_n(' ', pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    if i + 1 < used {
                        text.extend(std::iter::repeat_n(' ', pad));
                    }
                }
            }
            out.push_str(&text);
            out.push('\n');
        }
        out
    }
}

/// Resolves a `-o` column list against the available columns.
///
/// `None` selects every column in order. Otherwise `requested` is a
/// comma-separated list of names matched case-insensitively (`NAME,size`);
/// the result holds the index in `all` of each, in the order asked,
/// repeats allowed. An unknown or empty name is an error naming it:
/// `invalid property 'x'`.
pub fn select_columns(all: &[&str], requested: Option<&str>) -> Result<Vec<usize>, String> {
    let Some(requested) = requested else {
        return Ok((0..all.len()).collect());
    };
    requested
        .split(',')
        .map(|want| {
            if want.is_empty() {
                return Err(format!(
                    "empty property name in -o '{requested}' (names are separated by single commas)"
                ));
            }
            all.iter()
                .position(|have| have.eq_ignore_ascii_case(want))
                .ok_or_else(|| {
                    format!(
                        "invalid property '{want}' for -o (valid: {})",
                        all.join(", ")
                    )
                })
        })
        .collect()
}

/// Wraps `-j` output in zpool's envelope:
/// `{"output_version": {"command": command, "vers_major": 0, "vers_minor": 1}, key: body}`.
/// The NAME PROPERTY VALUE SOURCE table of `get`, with `-o` choosing fields.
pub fn render_get(
    rows: &[[String; 4]],
    fields: Option<&str>,
    scripted: bool,
) -> Result<String, String> {
    const FIELDS: &[&str] = &["name", "property", "value", "source"];
    let sel = select_columns(FIELDS, Some(fields.unwrap_or("name,property,value,source")))
        .map_err(|e| e.replace("property", "field"))?;
    let mut t = Table::new(
        sel.iter().map(|&i| FIELDS[i].to_uppercase()),
        vec![false; sel.len()],
    );
    for r in rows {
        t.push(sel.iter().map(|&i| r[i].clone()));
    }
    Ok(t.render(scripted))
}

pub fn json_envelope(command: &str, key: &str, body: Value) -> Value {
    let mut map = Map::new();
    map.insert(
        "output_version".to_string(),
        json!({ "command": command, "vers_major": 0, "vers_minor": 1 }),
    );
    map.insert(key.to_string(), body);
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_table() -> Table {
        let mut t = Table::new(
            ["NAME", "SIZE", "ALLOC", "FREE", "HEALTH"],
            vec![false, true, true, true, false],
        );
        t.push(["tank", "9.50G", "110K", "9.50G", "ONLINE"]);
        t.push(["backup-pool", "100G", "1.88G", "98.1G", "DEGRADED"]);
        t
    }

    #[test]
    fn renders_aligned_columns() {
        let want = "\
NAME          SIZE  ALLOC   FREE  HEALTH
tank         9.50G   110K  9.50G  ONLINE
backup-pool   100G  1.88G  98.1G  DEGRADED
";
        assert_eq!(pool_table().render(false), want);
    }

    #[test]
    fn renders_scripted_with_tabs_and_no_header() {
        let want = "tank\t9.50G\t110K\t9.50G\tONLINE\nbackup-pool\t100G\t1.88G\t98.1G\tDEGRADED\n";
        assert_eq!(pool_table().render(true), want);
    }

    #[test]
    fn right_aligned_last_column_is_padded_on_the_left() {
        let mut t = Table::new(["NAME", "CAP"], vec![false, true]);
        t.push(["a", "5%"]);
        t.push(["bb", "100%"]);
        assert_eq!(t.render(false), "NAME   CAP\na       5%\nbb    100%\n");
    }

    #[test]
    fn ragged_rows_and_unicode_width() {
        let mut t = Table::new(["A", "B"], vec![]);
        t.push(["\u{e9}t\u{e9}"]);
        t.push(["x", "y", "zz"]);
        assert_eq!(t.render(false), "A    B\n\u{e9}t\u{e9}\nx    y  zz\n");
        assert_eq!(t.render(true), "\u{e9}t\u{e9}\nx\ty\tzz\n");
        let mut t = Table::new(["NAME", "ALTROOT", "X"], vec![false, false, true]);
        t.push(["tank", "", ""]);
        t.push(["b", "/mnt", "7"]);
        assert_eq!(
            t.render(false),
            "NAME  ALTROOT  X\ntank\nb     /mnt     7\n"
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn empty_table_renders_header_only() {
        let t = Table::new(
            vec!["NAME".to_string(), "SIZE".to_string()],
            vec![false, true],
        );
        assert!(t.is_empty());
        assert_eq!(t.render(false), "NAME  SIZE\n");
        assert_eq!(t.render(true), "");
    }

    #[test]
    fn selects_columns() {
        let all = ["name", "size", "alloc", "health"];
        assert_eq!(select_columns(&all, None), Ok(vec![0, 1, 2, 3]));
        assert_eq!(select_columns(&all, Some("health,NAME")), Ok(vec![3, 0]));
        assert_eq!(select_columns(&all, Some("Size,size")), Ok(vec![1, 1]));
        let valid = " for -o (valid: name, size, alloc, health)";
        assert_eq!(
            select_columns(&all, Some("name,bogus,size")),
            Err(format!("invalid property 'bogus'{valid}"))
        );
        let empty = |l: &str| {
            Err(format!(
                "empty property name in -o '{l}' (names are separated by single commas)"
            ))
        };
        assert_eq!(select_columns(&all, Some("")), empty(""));
        assert_eq!(select_columns(&all, Some("name,")), empty("name,"));
        assert_eq!(
            select_columns(&all, Some("name,,size")),
            empty("name,,size")
        );
    }

    #[test]
    fn json_envelope_shape() {
        let v = json_envelope("zpool list", "pools", json!({ "tank": { "name": "tank" } }));
        assert_eq!(
            v,
            json!({
                "output_version": { "command": "zpool list", "vers_major": 0, "vers_minor": 1 },
                "pools": { "tank": { "name": "tank" } }
            })
        );
    }
}
