//! The one table type of the reports: columns, rows of cells and the notes
//! under them, built once by a section and rendered as aligned text
//! (stdout) or as Markdown, each cell escaped for Markdown by its kind.

use super::{md_code, md_text};

/// One cell: its text, and how Markdown shows it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Cell {
    /// Figures and the report's own words: the same text everywhere (in
    /// Markdown `<` and `|` are escaped, so that a cell stays one cell).
    Plain(String),
    /// Free text from the run (a name, a mode, the CPU): one line, its
    /// Markdown punctuation and HTML escaped in Markdown.
    Text(String),
    /// A name shown as code in Markdown (a metric, a commit).
    Code(String),
    /// Stressed in Markdown (a failed target).
    Strong(String),
    /// Already Markdown, shown as it is (a cell that mixes kinds).
    Markdown(String),
    /// Nothing measured or known: "—" everywhere.
    Missing,
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Plain(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Plain(s.to_string())
    }
}

/// A figure, or [`Cell::Missing`] where there is none.
impl From<Option<String>> for Cell {
    fn from(s: Option<String>) -> Cell {
        s.map_or(Cell::Missing, Cell::Plain)
    }
}

impl Cell {
    /// As aligned text shows it.
    fn text(&self) -> String {
        match self {
            Cell::Plain(s) | Cell::Text(s) | Cell::Code(s) | Cell::Strong(s) | Cell::Markdown(s) => s.clone(),
            Cell::Missing => "—".to_string(),
        }
    }

    /// As Markdown shows it.
    fn markdown(&self) -> String {
        match self {
            Cell::Plain(s) => s.replace('<', "&lt;").replace('|', "\\|"),
            Cell::Text(s) => md_text(s),
            Cell::Code(s) => format!("`{}`", md_code(s)),
            Cell::Strong(s) => format!("**{}**", md_text(s)),
            Cell::Markdown(s) => s.clone(),
            Cell::Missing => "—".to_string(),
        }
    }
}

/// A column: its title, and where it shows.
struct Column {
    title: String,
    /// The title in text, where it must be shorter to fit a terminal.
    short: Option<String>,
    /// Left-aligned (text) rather than right-aligned (figures).
    left: bool,
    /// Shown in Markdown only (a terminal has no room for it).
    markdown_only: bool,
}

/// A table: right-aligned unless marked left; in text 2-space gutters, in
/// Markdown `|` rules; then its notes.
pub(super) struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<Cell>>,
    /// Paragraphs under the table.
    notes: Vec<String>,
}

impl Table {
    pub(super) fn new(titles: &[&str]) -> Self {
        Table {
            columns: titles
                .iter()
                .map(|t| Column {
                    title: t.to_string(),
                    short: None,
                    left: false,
                    markdown_only: false,
                })
                .collect(),
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(super) fn left(&mut self, col: usize) -> &mut Self {
        self.columns[col].left = true;
        self
    }

    /// Column `col`'s title in text.
    pub(super) fn short(&mut self, col: usize, title: &str) -> &mut Self {
        self.columns[col].short = Some(title.to_string());
        self
    }

    /// Column `col` shows in Markdown only.
    pub(super) fn markdown_only(&mut self, col: usize) -> &mut Self {
        self.columns[col].markdown_only = true;
        self
    }

    pub(super) fn row<C: Into<Cell>>(&mut self, row: impl IntoIterator<Item = C>) {
        let row: Vec<Cell> = row.into_iter().map(Into::into).collect();
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// A paragraph under the table.
    pub(super) fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// The header and the rows as text or `markdown` shows them (the
    /// columns it shows, their titles there), and whether each column is
    /// left-aligned.
    fn grid(&self, markdown: bool) -> (Vec<Vec<String>>, Vec<bool>) {
        let keep: Vec<usize> = (0..self.columns.len())
            .filter(|&i| markdown || !self.columns[i].markdown_only)
            .collect();
        let header = keep.iter().map(|&i| {
            let c = &self.columns[i];
            match (&c.short, markdown) {
                (Some(s), false) => s.clone(),
                _ => c.title.clone(),
            }
        });
        let mut grid = vec![header.collect::<Vec<_>>()];
        for r in &self.rows {
            let cell = |i: usize| if markdown { r[i].markdown() } else { r[i].text() };
            grid.push(keep.iter().map(|&i| cell(i)).collect());
        }
        (grid, keep.iter().map(|&i| self.columns[i].left).collect())
    }

    /// Aligned text: the header, a rule of dashes, the rows, then the notes
    /// (each a line or more).
    pub(super) fn text(&self) -> String {
        let (grid, left) = self.grid(false);
        let w = widths(&grid, 0);
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        let mut out = lines(&grid, &rule.join("  "), |cells| {
            padded(cells, &w, &left).join("  ").trim_end().to_string()
        });
        for n in &self.notes {
            push_line(&mut out, n);
        }
        out
    }

    /// Markdown, padded to align in the source, then the notes (each a
    /// paragraph after a blank line).
    pub(super) fn markdown(&self) -> String {
        let (grid, left) = self.grid(true);
        let w = widths(&grid, 3);
        let rule: Vec<String> = w
            .iter()
            .zip(&left)
            .map(|(&n, &l)| {
                if l {
                    format!(":{}", "-".repeat(n - 1))
                } else {
                    format!("{}:", "-".repeat(n - 1))
                }
            })
            .collect();
        let mut out = lines(&grid, &format!("| {} |", rule.join(" | ")), |cells| {
            format!("| {} |", padded(cells, &w, &left).join(" | "))
        });
        for n in self.notes.iter().filter(|n| !n.is_empty()) {
            out.push('\n');
            push_line(&mut out, n);
        }
        out
    }

    /// Markdown without padding: `| a | b |` rows under a `|---|---:|`
    /// rule (no mark on a left column). An empty cell is one space.
    pub(super) fn compact_markdown(&self) -> String {
        let (grid, left) = self.grid(true);
        let rule: Vec<&str> = left.iter().map(|&l| if l { "---" } else { "---:" }).collect();
        lines(&grid, &format!("|{}|", rule.join("|")), |cells| {
            let parts: Vec<String> = cells
                .iter()
                .map(|c| {
                    if c.is_empty() {
                        " ".to_string()
                    } else {
                        format!(" {c} ")
                    }
                })
                .collect();
            format!("|{}|", parts.join("|"))
        })
    }
}

/// The header line of `grid`, `rule`, then a line per row, each line as
/// `line` makes it.
fn lines(grid: &[Vec<String>], rule: &str, line: impl Fn(&[String]) -> String) -> String {
    let mut out = format!("{}\n{rule}\n", line(&grid[0]));
    for r in &grid[1..] {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// Each cell of a row padded to its column's width, on the right where
/// the column is `left`.
fn padded(cells: &[String], widths: &[usize], left: &[bool]) -> Vec<String> {
    cells
        .iter()
        .enumerate()
        .map(|(i, c)| pad(c, widths[i], left[i]))
        .collect()
}

/// `text`, ended by a newline.
fn push_line(out: &mut String, text: &str) {
    out.push_str(text);
    if !text.ends_with('\n') {
        out.push('\n');
    }
}

/// Each column's width in characters, at least `min`.
fn widths(grid: &[Vec<String>], min: usize) -> Vec<usize> {
    let mut w = vec![min; grid[0].len()];
    for r in grid {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    w
}

/// `text` padded to `width` characters, on the right if `left`.
fn pad(text: &str, width: usize, left: bool) -> String {
    let pad = " ".repeat(width.saturating_sub(text.chars().count()));
    if left {
        format!("{text}{pad}")
    } else {
        format!("{pad}{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table, two renderings: short titles and Markdown-only columns in
    /// text, each cell escaped by its kind in Markdown.
    #[test]
    fn one_table_renders_as_text_and_markdown() {
        let mut t = Table::new(&["name", "concurrency", "wide", "value"]);
        t.left(0).short(1, "conc").markdown_only(2);
        t.row([
            Cell::Code("a|b".into()),
            "4".into(),
            Cell::Text("x_y".into()),
            Cell::Strong("FAIL".into()),
        ]);
        t.row([
            Cell::Text("<c>".into()),
            "16".into(),
            Cell::Missing,
            Cell::Missing,
        ]);
        t.note("All good.");
        assert_eq!(
            t.text(),
            "name  conc  value\n----  ----  -----\na|b      4   FAIL\n<c>     16      —\nAll good.\n"
        );
        let md = t.markdown();
        assert!(
            md.starts_with("| name      | concurrency | wide |    value |\n"),
            "{md}"
        );
        assert!(
            md.contains("| `a\\|b`    |           4 | x\\_y | **FAIL** |"),
            "{md}"
        );
        assert!(
            md.contains("| &lt;c&gt; |          16 |    — |        — |"),
            "{md}"
        );
        assert!(md.ends_with("|\n\nAll good.\n"), "{md}");
    }
}
