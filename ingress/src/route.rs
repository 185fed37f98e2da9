//! Routing: host and path of a request to a configured route.
//!
//! A route matches when its host is absent or equal to the request's host
//! (ASCII case-insensitive, port ignored) and its path is a prefix of the
//! request's path at a segment boundary (`/acme` matches `/acme`,
//! `/acme/x` and `/acme?q`, not `/acmex`). The longest matching path wins;
//! on equal length a route naming the host wins over one that does not.

use config::Cluster;
use config::normalize_host;

#[derive(Clone, Debug)]
struct Entry {
    host: Option<String>,
    path: String,
    route: u16,
}

/// The routing table, built once from the cluster config.
#[derive(Clone, Debug)]
pub struct Router {
    entries: Vec<Entry>,
}

impl Router {
    /// The routes of `cluster` (route id = position in the file).
    pub fn new(cluster: &Cluster) -> Self {
        let mut entries: Vec<Entry> = cluster
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| Entry { host: r.host.as_deref().map(normalize_host), path: r.path.clone(), route: i as u16 })
            .collect();
        // Longest path first; then host-specific before any-host.
        entries.sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(b.host.is_some().cmp(&a.host.is_some())));
        Self { entries }
    }

    /// The route of a request to `host` (from the Host header, if any) and
    /// `path` (origin-form path, query included or not).
    pub fn lookup(&self, host: Option<&str>, path: &str) -> Option<u16> {
        // Entries hold normalized hosts; the request's is compared without
        // a copy (this runs for every request).
        let host = host.map(config::host_name);
        self.entries
            .iter()
            .find(|e| {
                e.host.as_ref().is_none_or(|h| host.is_some_and(|r| r.eq_ignore_ascii_case(h)))
                    && prefix_matches(&e.path, path)
            })
            .map(|e| e.route)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let Some(rest) = path.strip_prefix(prefix) else { return false };
    prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut s = String::from(
            "[[node]]\nname = \"n\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"/tmp/x\"\n\
             [[tenant]]\nname = \"t\"\nweight = 1\nbuffers = 64\nrecv_quota = 1\n\
             [[function]]\nname = \"f\"\ntenant = \"t\"\nnode = \"n\"\n",
        );
        for (host, path) in [(None, "/"), (None, "/acme"), (None, "/acme/deep/"), (Some("api.example"), "/acme")] {
            s.push_str("[[route]]\n");
            if let Some(h) = host {
                s.push_str(&format!("host = \"{h}\"\n"));
            }
            s.push_str(&format!("path = \"{path}\"\ntenant = \"t\"\nchain = [\"f\"]\n"));
        }
        Router::new(&Cluster::parse(&s).unwrap())
    }

    #[test]
    fn longest_prefix_at_segment_boundaries_host_specific_first() {
        let r = router();
        assert_eq!(r.lookup(None, "/acme"), Some(1));
        assert_eq!(r.lookup(None, "/acme/x"), Some(1));
        assert_eq!(r.lookup(None, "/acme?q=1"), Some(1));
        assert_eq!(r.lookup(None, "/acmex"), Some(0));
        assert_eq!(r.lookup(None, "/acme/deep/x"), Some(2));
        assert_eq!(r.lookup(None, "/acme/deep"), Some(1));
        assert_eq!(r.lookup(Some("API.example:8080"), "/acme/x"), Some(3));
        assert_eq!(r.lookup(Some("Api.Example.:80"), "/acme/x"), Some(3));
        assert_eq!(r.lookup(Some("api.example.org"), "/acme/x"), Some(1));
        assert_eq!(r.lookup(Some("other.example"), "/acme/x"), Some(1));
        assert_eq!(r.lookup(Some("[::1]:80"), "/zzz"), Some(0));
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let mut r = router();
        r.entries.retain(|e| e.path != "/");
        assert_eq!(r.lookup(None, "/nope"), None);
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert_eq!(normalize_host("Example.COM."), "example.com");
    }
}
