//! `Host` header values and absolute-form authorities from any HTTP client
//! (the ingress checks every request's with `config::is_host` before it
//! routes by `config::host_name`): checking and normalizing any string
//! never panics, and an accepted host names a non-empty host without a
//! port or a trailing dot, whose normal form is its own normal form.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = std::str::from_utf8(data) else { return };
    let accepted = config::is_host(h);
    let name = config::host_name(h);
    let normal = config::normalize_host(h);
    assert!(normal.eq_ignore_ascii_case(name));
    if accepted {
        assert!(!name.is_empty(), "an accepted host {h:?} names a host");
        assert!(!name.ends_with('.'), "{name:?} keeps no trailing dot");
        assert!(config::is_host(name), "{h:?} without its port, {name:?}, is a host");
        assert_eq!(config::host_name(name), name, "{name:?} has no port left to strip");
        assert_eq!(config::normalize_host(&normal), normal);
    }
});
