//! Byte ranges `(start, end)`, end exclusive, kept in order with touching ones joined: how the agent describes
//! where a volume holds data, where two devices differ, and what a revert rewrites.

/// Appends `(start, end)` to `ranges`, joining it to the last range when it starts inside or right at the end of
/// it. A range that starts before the last one is appended as it is; [`normalize`] orders and joins such lists.
pub fn push_joined<T: Copy + Ord>(ranges: &mut Vec<(T, T)>, start: T, end: T) {
    match ranges.last_mut() {
        Some(last) if last.0 <= start && start <= last.1 => last.1 = last.1.max(end),
        _ => ranges.push((start, end)),
    }
}

/// Orders `ranges` and joins the ones that touch or overlap.
pub fn normalize<T: Copy + Ord>(mut ranges: Vec<(T, T)>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        push_joined(&mut out, start, end);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_and_overlapping_ranges_are_joined_and_gaps_kept() {
        let mut r = Vec::new();
        for (s, e) in [(0u64, 4), (4, 8), (6, 7), (7, 12), (20, 24)] {
            push_joined(&mut r, s, e);
        }
        assert_eq!(r, vec![(0, 12), (20, 24)]);
    }

    #[test]
    fn a_range_before_the_last_is_not_swallowed_and_normalize_orders_it() {
        let mut r = vec![(100u64, 200)];
        push_joined(&mut r, 10, 20);
        assert_eq!(r, vec![(100, 200), (10, 20)]);
        assert_eq!(normalize(vec![(100u64, 200), (10, 20), (20, 100), (300, 301)]), vec![(10, 200), (300, 301)]);
        assert_eq!(normalize(Vec::<(u64, u64)>::new()), vec![]);
    }
}
