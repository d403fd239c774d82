//! Reading a Prometheus text exposition (what every service's `/metrics` answers): one
//! series picked by its labels, or the total over the series that carry them. For the sum
//! over all of a metric's series (or an unlabelled metric's value) there is
//! `admin::metric_sum`, shared with the tools.

/// The value of the first sample of `name` whose labels include every one of `labels`
/// (`key="value"`, matched exactly; others may be there too); `None` when no sample has
/// them. `labels` empty: the first sample of `name`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name).find(|sample| sample.has(labels)).map(|sample| sample.value)
}

/// The sum over every sample of `name` whose labels include every one of `labels`; 0 when
/// none has them.
pub fn metric_total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples(text, name).filter(|sample| sample.has(labels)).map(|sample| sample.value).sum()
}

/// One `name{labels} value` line.
struct Sample<'a> {
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl Sample<'_> {
    fn has(&self, wanted: &[(&str, &str)]) -> bool {
        wanted.iter().all(|(key, value)| self.labels.iter().any(|(k, v)| k == key && v == value))
    }
}

/// The samples of `name` (not of a longer name it begins), in the order of the text;
/// comments and lines that do not parse are passed over.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = Sample<'a>> + 'a {
    text.lines().filter(|line| !line.starts_with('#')).filter_map(move |line| {
        // The value is the last field: label values may hold spaces, the value cannot.
        let (series, value) = line.trim_end().rsplit_once(' ')?;
        let (series_name, labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, labels(rest.strip_suffix('}')?)?),
            None => (series, Vec::new()),
        };
        (series_name == name).then_some(())?;
        Some(Sample { labels, value: value.parse().ok()? })
    })
}

/// `key="value",...` with the format's escapes in values (`\\`, `\"`, `\n`).
fn labels(mut text: &str) -> Option<Vec<(&str, String)>> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if text.is_empty() {
            return Some(labels);
        }
        let (key, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (at, '"') => break at,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    escaped => value.push(escaped),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim(), value));
        text = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP requests_total Requests.
# TYPE requests_total counter
requests_total{api=\"grpc_predict\",model=\"ae\",version=\"1\"} 3
requests_total{api=\"grpc_predict\",model=\"ae\",version=\"2\"} 4
requests_total{api=\"rest_predict\",model=\"ae\",version=\"2\"} 5
requests_total_bytes{api=\"grpc_predict\"} 100
requests_total{api=\"grpc_predict\",model=\"sub\",submodel=\"ae\",version=\"1\"} 6
decisions_total{decision=\"rolled back, \\\"late\\\"\"} 1
queue_depth 7
";

    #[test]
    fn one_series_by_a_subset_of_its_labels() {
        assert_eq!(metric(PAGE, "requests_total", &[("model", "ae"), ("version", "2")]), Some(4.0));
        assert_eq!(metric(PAGE, "requests_total", &[("api", "rest_predict")]), Some(5.0));
        assert_eq!(metric(PAGE, "requests_total", &[]), Some(3.0), "no labels: the first series");
        assert_eq!(metric(PAGE, "queue_depth", &[]), Some(7.0));
        assert_eq!(metric(PAGE, "requests_total", &[("model", "other")]), None);
        assert_eq!(metric(PAGE, "missing", &[]), None);
    }

    #[test]
    fn labels_match_exactly_by_key_and_value() {
        let submodel = [("model", "sub"), ("submodel", "ae")];
        assert_eq!(metric(PAGE, "requests_total", &submodel), Some(6.0));
        assert_eq!(metric_total(PAGE, "requests_total", &[("model", "ae")]), 12.0, "not the submodel's");
        assert_eq!(metric(PAGE, "decisions_total", &[("decision", "rolled back, \"late\"")]), Some(1.0));
    }

    #[test]
    fn the_total_over_the_series_with_the_labels() {
        assert_eq!(metric_total(PAGE, "requests_total", &[("api", "grpc_predict")]), 13.0);
        assert_eq!(metric_total(PAGE, "requests_total", &[]), 18.0, "a longer name is another metric");
        assert_eq!(metric_total(PAGE, "requests_total", &[("api", "kserve_infer")]), 0.0);
    }
}
