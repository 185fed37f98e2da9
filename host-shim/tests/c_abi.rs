//! The C ABI as a C programmer meets it: C programs built with only the
//! generated `dne_shim.h` and the build-tree `dne-shim.pc`, with warnings
//! as errors.

use host_shim::ffi::{PKGCONFIG_DIR, dne_status};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(60);

/// A scratch directory, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dne-cabi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `pkg-config ARGS dne-shim` against the build-tree `.pc`.
fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("dne-shim")
        .env("PKG_CONFIG_PATH", PKGCONFIG_DIR)
        .output()
        .expect("pkg-config runs");
    assert!(out.status.success(), "pkg-config: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(str::to_owned).collect()
}

/// Runs `cmd` to its end within the watchdog; its exit status and output.
fn run(what: &str, mut cmd: Command) -> (bool, String, String) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(WATCHDOG) else {
        let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
        panic!("{what}: still running after {WATCHDOG:?}");
    };
    let out = out.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Builds `src` (C, or C++ when `cxx`) into `dir` with the flags of
/// `pkg-config --cflags --libs dne-shim` and warnings as errors.
fn build(dir: &Path, name: &str, src: &str, cxx: bool) -> PathBuf {
    let file = dir.join(if cxx { format!("{name}.cpp") } else { format!("{name}.c") });
    std::fs::write(&file, src).unwrap();
    let exe = dir.join(name);
    let (compiler, std) = if cxx { ("g++", "-std=c++11") } else { ("gcc", "-std=c99") };
    let mut cc = Command::new(compiler);
    cc.args([std, "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(&file)
        .args(pkg_config(&["--cflags", "--libs"]))
        .arg("-pthread")
        .arg("-o")
        .arg(&exe);
    let (ok, _, err) = run(compiler, cc);
    assert!(ok, "{compiler} {std} failed on {name}:\n{err}");
    exe
}

/// A command running `exe`, without the `LD_LIBRARY_PATH` cargo gives the
/// test (it lists `target/<profile>`, whose copy of the library may be
/// older than the header): the rpath of `dne-shim.pc` finds it.
fn command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

/// The status codes as a C program prints them, one `NAME VALUE` a line.
fn c_printing(names: &[String]) -> String {
    let mut src = String::from("#include <dne_shim.h>\n#include <stdio.h>\nint main(void) {\n");
    for n in names {
        src.push_str(&format!("    printf(\"{n} %d %s\\n\", (int){n}, dne_error_code_str((int){n}));\n"));
    }
    src.push_str("    return 0;\n}\n");
    src
}

/// Every `dne_status` and every error code of an error descriptor
/// (`dne_msg_error_code`) is a constant of the header, with the library's
/// value, in C99 and in C++11 (both with `-pedantic -Werror`); the error
/// codes' constants are named as `dne_error_code_str` names them.
#[test]
fn the_headers_constants_are_the_librarys_in_c_and_cxx() {
    let dir = Dir::new("consts");
    let statuses: Vec<(String, i32)> = dne_status::ALL.iter().map(|s| (format!("{s:?}"), *s as i32)).collect();
    let codes: Vec<(String, i32)> = wire::ErrorCode::ALL
        .iter()
        .map(|c| (format!("DNE_MSG_ERR_{}", c.as_str().to_uppercase()), i32::from(*c as u8)))
        .collect();
    let names: Vec<String> = statuses.iter().chain(&codes).map(|(n, _)| n.clone()).collect();
    for cxx in [false, true] {
        let exe = build(&dir.0, if cxx { "consts_cxx" } else { "consts_c" }, &c_printing(&names), cxx);
        let (ok, out, err) = run("constants", command(&exe));
        assert!(ok, "{err}");
        let got: Vec<(String, i32, String)> = out
            .lines()
            .map(|l| {
                let mut w = l.split(' ');
                let (n, v, s) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap());
                (n.to_owned(), v.parse().unwrap(), s.to_owned())
            })
            .collect();
        for ((n, v, s), (want_n, want_v)) in got.iter().zip(statuses.iter().chain(&codes)) {
            assert_eq!((n, v), (want_n, want_v), "cxx: {cxx}");
            if let Some(name) = n.strip_prefix("DNE_MSG_ERR_") {
                assert_eq!(s.to_uppercase(), name, "cxx: {cxx}");
            }
        }
        assert_eq!(got.len(), names.len());
    }
}

/// The library exports exactly the functions the header declares.
#[test]
fn the_library_exports_what_the_header_declares() {
    let include = PathBuf::from(host_shim::ffi::INCLUDE_DIR).join("dne_shim.h");
    let header = std::fs::read_to_string(include).unwrap();
    let mut declared: Vec<&str> = header
        .split(|c: char| c.is_whitespace() || c == '*')
        .filter_map(|w| w.split_once('(').map(|(name, _)| name))
        .filter(|w| w.starts_with("dne_"))
        .collect();
    declared.sort_unstable();
    declared.dedup();
    let libdir = pkg_config(&["--variable=libdir"]).remove(0);
    let mut nm = Command::new("nm");
    nm.args(["-D", "--defined-only"]).arg(Path::new(&libdir).join("libhost_shim.so"));
    let (ok, out, err) = run("nm", nm);
    assert!(ok, "{err}");
    let mut exported: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).filter(|_| l.split_whitespace().nth(1) == Some("T")))
        .filter(|s| s.starts_with("dne_"))
        .collect();
    exported.sort_unstable();
    assert_eq!(declared, exported);
    assert!(exported.len() >= 14, "{exported:?}");
}
