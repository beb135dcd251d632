//! Poison isolation: ChurnZero refuses a whole request when one of its
//! actions is bad, and says neither which one nor why for each. A refused
//! request is split in halves, each sent on its own, until the refused
//! items are alone; so one bad event (or contact update) costs only itself
//! and the others go through. Delivery and the sync lane both send this way;
//! the rule lives here once, and each caller keeps what sending and giving
//! up mean for it.

/// The parts still to send, in the order the items came: the first half of
/// a split goes before the second, so a key's events keep their order.
#[derive(Debug)]
pub struct Isolation<T> {
    stack: Vec<Vec<T>>,
}

impl<T> Isolation<T> {
    /// Starts with everything in one part (nothing to send: no part).
    pub fn new(items: Vec<T>) -> Isolation<T> {
        let stack = if items.is_empty() {
            Vec::new()
        } else {
            vec![items]
        };
        Isolation { stack }
    }

    /// The next part to send.
    pub fn next_part(&mut self) -> Option<Vec<T>> {
        self.stack.pop()
    }

    /// ChurnZero refused `part`. A part of several items is split in halves,
    /// sent next (first half first), and `None` is returned; a part of one
    /// item is that item: it is the poison, and the caller gives it up.
    pub fn refused(&mut self, mut part: Vec<T>) -> Option<T> {
        if part.len() > 1 {
            let second = part.split_off(part.len() / 2);
            self.stack.push(second);
            self.stack.push(part);
            None
        } else {
            part.pop()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Isolation;

    /// Drives an isolation against a ChurnZero that refuses any request
    /// holding a poison item: returns the requests sent and the items given up.
    fn run(items: Vec<u32>, poison: &[u32]) -> (Vec<Vec<u32>>, Vec<u32>) {
        let (mut sent, mut dead) = (Vec::new(), Vec::new());
        let mut iso = Isolation::new(items);
        while let Some(part) = iso.next_part() {
            sent.push(part.clone());
            if part.iter().any(|i| poison.contains(i)) {
                dead.extend(iso.refused(part));
            }
        }
        (sent, dead)
    }

    #[test]
    fn one_poison_costs_only_itself_and_order_is_kept() {
        let (sent, dead) = run((1..=8).collect(), &[6]);
        assert_eq!(dead, [6]);
        let accepted: Vec<u32> = sent
            .iter()
            .filter(|p| !p.contains(&6))
            .flatten()
            .copied()
            .collect();
        assert_eq!(accepted, [1, 2, 3, 4, 5, 7, 8]);
        assert_eq!(
            sent,
            [
                vec![1, 2, 3, 4, 5, 6, 7, 8],
                vec![1, 2, 3, 4],
                vec![5, 6, 7, 8],
                vec![5, 6],
                vec![5],
                vec![6],
                vec![7, 8],
            ]
        );
    }

    #[test]
    fn nothing_refused_is_one_request_and_nothing_is_no_request() {
        assert_eq!(run(vec![1, 2, 3], &[]), (vec![vec![1, 2, 3]], vec![]));
        assert_eq!(run(vec![], &[]), (vec![], vec![]));
        assert_eq!(run(vec![1, 2], &[1, 2]).1, [1, 2]);
    }
}
