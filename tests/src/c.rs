//! C and C++ programs built against the shim library as a C programmer
//! builds them: only the generated `dne_shim.h` and `pkg-config dne-shim`,
//! warnings as errors.
//!
//! The `dne-shim.pc` used is the build-tree one of the host-shim this crate
//! was built with (`host_shim::ffi::PKGCONFIG_DIR`): it names the generated
//! header and links the `libhost_shim.so` cargo built for this test run, in
//! `target/<profile>/deps`, with an rpath to it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long a compiler or `pkg-config` may run before the test fails.
const WATCHDOG: Duration = Duration::from_secs(60);

/// The language of a program, which picks its compiler and standard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// C99: `cc -std=c99`.
    C99,
    /// C11: `cc -std=c11`.
    C11,
    /// C++11: `c++ -std=c++11`.
    Cxx11,
}

impl Lang {
    /// The compiler and its standard flag.
    fn compiler(self) -> (&'static str, &'static str) {
        match self {
            Self::C99 => ("cc", "-std=c99"),
            Self::C11 => ("cc", "-std=c11"),
            Self::Cxx11 => ("c++", "-std=c++11"),
        }
    }

    /// The file name extension of a source in this language.
    pub fn ext(self) -> &'static str {
        match self {
            Self::C99 | Self::C11 => "c",
            Self::Cxx11 => "cpp",
        }
    }
}

/// `pkg-config ARGS dne-shim` against the build-tree `dne-shim.pc`: the
/// words it prints. Panics with its error output when it fails.
pub fn pkg_config(args: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("pkg-config");
    cmd.args(args).arg("dne-shim").env("PKG_CONFIG_PATH", host_shim::ffi::PKGCONFIG_DIR);
    let out = crate::run("pkg-config", cmd, WATCHDOG);
    assert!(out.status.success(), "pkg-config {args:?} dne-shim: {}", out.stderr);
    out.stdout.split_whitespace().map(str::to_owned).collect()
}

/// Builds the program `src`, written in `lang`, into `dir` (named as `src`
/// without its extension) with `-Wall -Wextra -Werror`, then `extra`, then
/// the flags of `pkg-config --cflags --libs dne-shim`. Panics with the
/// compiler's output when the build fails.
///
/// Returns a command running the program, without the `LD_LIBRARY_PATH`
/// cargo gives a test: that lists `target/<profile>` first, whose copy of
/// the library only builds of host-shim itself refresh, and it would win
/// over the rpath of `dne-shim.pc` (a library older than the header).
pub fn build(dir: &Path, src: &Path, lang: Lang, extra: &[&str]) -> Command {
    let stem = src.file_stem().unwrap_or_else(|| panic!("{} names no file", src.display()));
    let exe = dir.join(stem);
    let (compiler, std) = lang.compiler();
    let mut cc = Command::new(compiler);
    cc.args([std, "-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg(src)
        .args(pkg_config(&["--cflags", "--libs"]))
        .arg("-o")
        .arg(&exe);
    let out = crate::run(compiler, cc, WATCHDOG);
    assert!(out.status.success(), "{compiler} {std} {extra:?} failed on {}:\n{}", src.display(), out.stderr);
    let mut cmd = Command::new(exe);
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program that uses the library links, and runs with the library
    /// found by its rpath alone.
    #[test]
    fn a_program_built_against_the_library_runs() {
        let dir = crate::TempDir::new("c-build");
        let src = dir.path().join("status.c");
        let text = "#include <dne_shim.h>\n#include <stdio.h>\n\
                    int main(void) { printf(\"%s\\n\", dne_status_str(DNE_OK)); return 0; }\n";
        std::fs::write(&src, text).unwrap();
        let cmd = build(dir.path(), &src, Lang::C99, &["-pedantic"]);
        assert!(cmd.get_envs().any(|(k, v)| k == "LD_LIBRARY_PATH" && v.is_none()));
        let out = crate::run("status", cmd, WATCHDOG);
        assert!(out.status.success() && !out.stdout.trim().is_empty(), "{out:?}");
    }

    /// Warnings are errors, and the build's failure shows the compiler's
    /// message.
    #[test]
    fn a_warning_fails_the_build_with_the_compilers_message() {
        let dir = crate::TempDir::new("c-warning");
        let src = dir.path().join("unused.c");
        std::fs::write(&src, "#include <dne_shim.h>\nint main(void) { int unused_here; return 0; }\n").unwrap();
        let r = std::panic::catch_unwind(|| build(dir.path(), &src, Lang::C99, &[]));
        let msg = *r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.contains("unused_here"), "{msg}");
    }
}
