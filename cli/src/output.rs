//! Printing: aligned tables for people, JSON for scripts; and the flags several commands share.

use prost_types::Timestamp;

/// Prints rows under headers with columns padded to the widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints a value as pretty JSON.
pub fn json(value: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
}

/// Confirms a change that leaves nothing to show (a delete, an unexport): for scripts
/// `{"kind": …, "id": …, "status": …}`, for people `text`.
pub fn confirm(json: bool, kind: &str, id: &str, status: &str, text: &str) {
    if json {
        self::json(&serde_json::json!({ "kind": kind, "id": id, "status": status }));
    } else {
        println!("{text}");
    }
}

/// A timestamp as RFC 3339 UTC, or empty.
pub fn time(ts: &Option<Timestamp>) -> String {
    ts.as_ref().map(|t| t.to_string()).unwrap_or_default()
}

/// Every row of a paged list: calls `fetch` with each page request in turn (1000 rows a page, the most the
/// coordinator gives) until the answer carries no next-page token.
pub async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, tonic::Status>
where
    F: FnMut(ember_proto::v1::PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<ember_proto::v1::PageResponse>), tonic::Status>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (rows, page) = fetch(ember_proto::v1::PageRequest { page_size: 1000, page_token: token }).await?;
        all.extend(rows);
        token = page.map(|p| p.next_page_token).unwrap_or_default();
        if token.is_empty() {
            return Ok(all);
        }
    }
}

/// A new name and description for an update; either may be left out to keep it.
#[derive(Debug, clap::Args)]
pub struct Renaming {
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// New description.
    #[arg(long)]
    pub description: Option<String>,
}
