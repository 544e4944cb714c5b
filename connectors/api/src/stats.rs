//! [`ConnectorStats`]: how a connector exposes what it counts.
//!
//! A connector declares each of its metrics once, where it counts them: name, kind, help and
//! its own labels, reported with the current value. The host (the engine's metrics registry,
//! `receiver-node`'s `/metrics`) adds the label naming the connector (`receiver="orders"`) and
//! encodes everything; a connector depends on no metrics library.

/// Whether a value only grows (counter) or goes up and down (gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatKind {
    /// Only grows. The name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One metric with its current value.
#[derive(Debug, Clone, Copy)]
pub struct Stat<'a> {
    /// Prometheus name, `weir_<connector>_...`; a counter's ends in `_total`.
    pub name: &'static str,
    /// One line of help.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: StatKind,
    /// The connector's own labels (`topic`, `partition`); the host adds the connector's name.
    pub labels: &'a [(&'static str, &'a str)],
    /// The value.
    pub value: u64,
}

impl<'a> Stat<'a> {
    /// A counter without labels of its own.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Stat<'a> {
        Stat {
            name,
            help,
            kind: StatKind::Counter,
            labels: &[],
            value,
        }
    }

    /// A gauge without labels of its own.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Stat<'a> {
        Stat {
            name,
            help,
            kind: StatKind::Gauge,
            labels: &[],
            value,
        }
    }
}

/// What a connector counts, read at every scrape. Every metric a connector counts must be
/// reported here (its tests check that each one appears).
pub trait ConnectorStats: Send + Sync + 'static {
    /// Reports every metric with its current value. Metrics with labels of their own (one per
    /// partition, say) report once per label set, consecutively.
    fn report(&self, out: &mut dyn FnMut(Stat<'_>));
}

/// The names a [`ConnectorStats`] reports, in order, once each (for tests and docs).
pub fn stat_names(stats: &dyn ConnectorStats) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    stats.report(&mut |s| {
        if !names.contains(&s.name) {
            names.push(s.name);
        }
    });
    names
}

/// The fields of `debug` (a stats struct's `{:?}`: `Name { field: value, ... }`) that no
/// reported metric name contains: counted but not exported. For tests: every connector checks
/// that this is empty for its stats.
pub fn unreported_fields(debug: &str, stats: &dyn ConnectorStats) -> Vec<String> {
    let names = stat_names(stats);
    // The top-level field names: `name:` at brace depth 1.
    let mut fields = Vec::new();
    let (mut depth, mut token) = (0usize, String::new());
    for c in debug.chars() {
        match c {
            '{' | '[' | '(' => {
                depth += 1;
                token.clear();
            }
            '}' | ']' | ')' => depth = depth.saturating_sub(1),
            ':' if depth == 1 && !token.trim().is_empty() => {
                fields.push(token.trim().to_string());
                token.clear();
            }
            ',' => token.clear(),
            c if depth == 1 => token.push(c),
            _ => {}
        }
    }
    fields
        .into_iter()
        .filter(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .filter(|f| !names.iter().any(|n| n.contains(f.as_str())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default)]
    struct Two {
        seen: u64,
        hidden: std::sync::Mutex<Vec<(u8, u8)>>,
    }

    impl ConnectorStats for Two {
        fn report(&self, out: &mut dyn FnMut(Stat<'_>)) {
            out(Stat::counter("weir_x_seen_total", "seen", self.seen));
        }
    }

    #[test]
    fn a_field_that_no_metric_names_is_found() {
        let t = Two::default();
        crate::lock(&t.hidden).push((1, 2));
        assert_eq!(unreported_fields(&format!("{t:?}"), &t), ["hidden"]);
        assert_eq!(stat_names(&t), ["weir_x_seen_total"]);
    }
}
