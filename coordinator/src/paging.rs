//! Keyset paging shared by the list calls. Rows are ordered by `(created_at, id)`; a page token names the last
//! row of the previous page as `<created_at>:<id>`, so a page stays correct while rows are added or removed.

use crate::error::{Error, Result};
use ember_proto::v1::{PageRequest, PageResponse};

/// Page size when the request gives none.
const DEFAULT_SIZE: u32 = 100;
/// The most rows one page holds, whatever the request asks.
const MAX_SIZE: u32 = 1000;

/// Where a page starts and how many rows it holds.
#[derive(Debug, PartialEq)]
pub struct Page {
    /// Rows in the page.
    pub size: i64,
    /// `created_at` of the previous page's last row (`i64::MIN` for the first page).
    pub after_ts: i64,
    /// `id` of the previous page's last row.
    pub after_id: String,
}

impl Page {
    /// The page a request asks for (`None` is the first page at the default size).
    pub fn of(req: Option<&PageRequest>) -> Result<Page> {
        let (size, token) = req.map(|p| (p.page_size, p.page_token.as_str())).unwrap_or((0, ""));
        let size = if size == 0 { DEFAULT_SIZE } else { size.min(MAX_SIZE) } as i64;
        let (after_ts, after_id) = match token.split_once(':') {
            Some((ts, id)) => {
                (ts.parse::<i64>().map_err(|_| Error::invalid("page.page_token", "malformed"))?, id.to_string())
            }
            None if token.is_empty() => (i64::MIN, String::new()),
            None => return Err(Error::invalid("page.page_token", "malformed")),
        };
        Ok(Page { size, after_ts, after_id })
    }

    /// How many rows to fetch: one more than the page holds, which tells whether another page follows.
    pub fn limit(&self) -> i64 {
        self.size + 1
    }

    /// Cuts `rows`, fetched with [`Page::limit`], to the page and answers with the next page's token (empty on
    /// the last page); `key` gives a row's `(created_at, id)`.
    pub fn cut<T>(&self, rows: &mut Vec<T>, key: impl Fn(&T) -> (i64, &str)) -> PageResponse {
        let more = rows.len() as i64 > self.size;
        rows.truncate(self.size as usize);
        let next_page_token = match rows.last() {
            Some(last) if more => {
                let (ts, id) = key(last);
                format!("{ts}:{id}")
            }
            _ => String::new(),
        };
        PageResponse { next_page_token }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u32, token: &str) -> PageRequest {
        PageRequest { page_size: size, page_token: token.into() }
    }

    #[test]
    fn requests_become_pages_and_bad_tokens_are_named() {
        assert_eq!(Page::of(None).unwrap(), Page { size: 100, after_ts: i64::MIN, after_id: String::new() });
        assert_eq!(Page::of(Some(&req(5000, ""))).unwrap().size, 1000);
        assert_eq!(Page::of(Some(&req(2, "17:abc"))).unwrap(), Page { size: 2, after_ts: 17, after_id: "abc".into() });
        for bad in ["abc", "x:abc"] {
            let err = Page::of(Some(&req(2, bad))).unwrap_err().to_string();
            assert_eq!(err, "page.page_token: malformed");
        }
    }

    #[test]
    fn a_page_is_cut_and_names_its_last_row_only_when_more_follow() {
        let page = Page::of(Some(&req(2, ""))).unwrap();
        let mut rows = vec![(1, "a"), (2, "b"), (3, "c")];
        assert_eq!(page.cut(&mut rows, |r| (r.0, r.1)).next_page_token, "2:b");
        assert_eq!(rows, [(1, "a"), (2, "b")]);
        let mut last = vec![(3, "c")];
        assert_eq!(page.cut(&mut last, |r| (r.0, r.1)).next_page_token, "");
    }
}
