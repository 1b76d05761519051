//! Pages of a list: every `GET` of a collection answers `{items, next}`, at most `limit` items
//! (1 to 500, default 100) after the cursor `after`, which is the previous page's `next`.
//!
//! A cursor is the sort key of the last item of a page (a name, an ID), so a page is stable
//! while items are added or removed elsewhere in the list: nothing is skipped or repeated
//! except what changed.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiError;

/// The largest page.
pub const MAX_LIMIT: usize = 500;
/// The page size when none is asked for.
pub const DEFAULT_LIMIT: usize = 100;

/// A page of a list. `next` is the cursor to pass as `after` for the following page; `None`
/// on the last page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

impl<T> Page<T> {
    pub fn map<U>(self, f: impl FnMut(T) -> U) -> Page<U> {
        Page {
            items: self.items.into_iter().map(f).collect(),
            next: self.next,
        }
    }
}

/// Where a page starts and how long it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    pub limit: usize,
    pub after: Option<String>,
}

impl PageRequest {
    /// Checks `limit` (1 to [`MAX_LIMIT`]; [`DEFAULT_LIMIT`] when absent).
    pub fn new(limit: Option<usize>, after: Option<String>) -> Result<Self, ApiError> {
        let limit = limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be between 1 and {MAX_LIMIT} (got {limit})"),
            ));
        }
        Ok(Self { limit, after })
    }

    /// The page of `items` (already filtered and sorted by `key`, ascending) after the cursor.
    /// `key` must be unique; `next` carries it as text, and `after` is read back with `FromStr`
    /// (a cursor that does not parse is a 400 naming `after`).
    pub fn page<T, K>(
        &self,
        items: impl IntoIterator<Item = T>,
        key: impl Fn(&T) -> K,
    ) -> Result<Page<T>, ApiError>
    where
        K: Ord + std::fmt::Display + std::str::FromStr,
    {
        let after = match &self.after {
            None => None,
            Some(a) => Some(a.parse::<K>().map_err(|_| {
                ApiError::invalid(
                    "after",
                    format!("'{a}' is not a cursor from a previous page (`next`)"),
                )
            })?),
        };
        let mut out = Vec::new();
        let mut more = false;
        for item in items {
            if after.as_ref().is_some_and(|a| key(&item) <= *a) {
                continue;
            }
            if out.len() == self.limit {
                more = true;
                break;
            }
            out.push(item);
        }
        let next = if more {
            out.last().map(|i| key(i).to_string())
        } else {
            None
        };
        Ok(Page { items: out, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("vm-{i:03}")).collect()
    }

    #[test]
    fn pages_walk_the_whole_list_once() {
        let all = names(7);
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let req = PageRequest::new(Some(3), after.clone()).expect("limit");
            let page = req.page(all.clone(), |s| s.clone()).expect("page");
            assert!(page.items.len() <= 3);
            seen.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, all);
    }

    #[test]
    fn an_exact_fit_has_no_next_page() {
        let page = PageRequest::new(Some(4), None)
            .expect("limit")
            .page(names(4), |s| s.clone())
            .expect("page");
        assert_eq!(page.items.len(), 4);
        assert_eq!(page.next, None);
    }

    #[test]
    fn a_removed_cursor_item_does_not_repeat_or_skip() {
        let mut all = names(6);
        let first = PageRequest::new(Some(2), None)
            .expect("limit")
            .page(all.clone(), |s| s.clone())
            .expect("page");
        all.retain(|s| Some(s) != first.next.as_ref());
        let second = PageRequest::new(Some(2), first.next)
            .expect("limit")
            .page(all, |s| s.clone())
            .expect("page");
        assert_eq!(
            second.items,
            vec!["vm-002".to_string(), "vm-003".to_string()]
        );
    }

    #[test]
    fn numeric_cursors_compare_as_numbers_and_garbage_is_refused() {
        let ids: Vec<u64> = (1..=12).collect();
        let first = PageRequest::new(Some(10), None)
            .expect("limit")
            .page(ids.clone(), |i| *i)
            .expect("page");
        assert_eq!(first.next.as_deref(), Some("10"));
        let second = PageRequest::new(Some(10), first.next)
            .expect("limit")
            .page(ids.clone(), |i| *i)
            .expect("page");
        assert_eq!(second.items, vec![11, 12], "11 sorts after 10, not after 1");
        let e = PageRequest::new(None, Some("x".into()))
            .expect("limit")
            .page(ids, |i| *i)
            .expect_err("bad cursor");
        assert_eq!(e.field.as_deref(), Some("after"));
    }

    #[test]
    fn limits_outside_the_range_are_refused() {
        for bad in [0, MAX_LIMIT + 1] {
            let e = PageRequest::new(Some(bad), None).expect_err("bad limit");
            assert_eq!(e.field.as_deref(), Some("limit"), "{e:?}");
        }
        assert_eq!(
            PageRequest::new(None, None).expect("default").limit,
            DEFAULT_LIMIT
        );
    }
}
