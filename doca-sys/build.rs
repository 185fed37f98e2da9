//! Generates DOCA bindings from the installed SDK when the `sdk` feature is on.
//!
//! SDK discovery, in order:
//! 1. `DOCA_SDK_PREFIX_<target triple with '-' as '_'>`, then `DOCA_SDK_PREFIX`:
//!    the SDK prefix (for example `/opt/mellanox/doca`); its
//!    `lib/<multiarch>/pkgconfig` is put in front of `PKG_CONFIG_PATH`;
//! 2. pkg-config: `doca-common`, `doca-comch`, `doca-rdma`, `doca-dma`.
//!
//! Without the feature nothing is generated and nothing is linked. With the
//! `decls` feature (hand-written declarations for type-checking, see
//! `src/decls.rs`) nothing is generated or linked either, even if `sdk` is on.

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=DOCA_SDK_PREFIX");
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=DOCA_SDK_PREFIX_{}", target.replace('-', "_"));
    // `decls` replaces the generated bindings: with it no SDK is looked for
    // and no library is linked, even if `sdk` is on too.
    #[cfg(feature = "sdk")]
    if std::env::var_os("CARGO_FEATURE_DECLS").is_none() {
        sdk::generate(&target);
    }
}

#[cfg(feature = "sdk")]
mod sdk {
    use std::env;
    use std::path::PathBuf;

    const LIBS: [&str; 4] = ["doca-common", "doca-comch", "doca-rdma", "doca-dma"];

    fn multiarch(target: &str) -> &'static str {
        if target.starts_with("aarch64") { "aarch64-linux-gnu" } else { "x86_64-linux-gnu" }
    }

    // A build script's stderr is what cargo shows when it fails: the place for
    // this message.
    #[allow(clippy::print_stderr)]
    fn fail(why: &str, target: &str) -> ! {
        eprintln!(
            "\nerror: doca-sys: the `sdk` feature is on but the NVIDIA DOCA SDK was not found for {target}.\n\
             \x20      {why}\n\
             \x20      Install the DOCA SDK development packages (doca-sdk-common, doca-sdk-comch, doca-sdk-rdma,\n\
             \x20      doca-sdk-dma; on BlueField they are in the BFB image) so that `pkg-config --cflags doca-common`\n\
             \x20      works, or set DOCA_SDK_PREFIX (or DOCA_SDK_PREFIX_{} for this target) to the SDK\n\
             \x20      prefix, e.g. /opt/mellanox/doca. Without the `sdk` feature DNE uses its emulated DOCA backend.\n",
            target.replace('-', "_")
        );
        std::process::exit(1);
    }

    pub(crate) fn generate(target: &str) {
        let prefix = env::var(format!("DOCA_SDK_PREFIX_{}", target.replace('-', "_")))
            .or_else(|_| env::var("DOCA_SDK_PREFIX"))
            .ok();
        if let Some(prefix) = &prefix {
            let pc = PathBuf::from(prefix).join("lib").join(multiarch(target)).join("pkgconfig");
            if !pc.is_dir() {
                fail(&format!("DOCA_SDK_PREFIX={prefix} has no {}", pc.display()), target);
            }
            let old = env::var("PKG_CONFIG_PATH").unwrap_or_default();
            let joined = if old.is_empty() { pc.display().to_string() } else { format!("{}:{old}", pc.display()) };
            // SAFETY: a build script is single-threaded; nothing reads the
            // environment concurrently.
            unsafe { env::set_var("PKG_CONFIG_PATH", joined) };
            // The prefix names this target's SDK, so pkg-config may use it
            // when cross-compiling.
            // SAFETY: as above, no other thread reads the environment.
            unsafe { env::set_var("PKG_CONFIG_ALLOW_CROSS", "1") };
        }
        let mut includes = Vec::new();
        for lib in LIBS {
            match pkg_config::Config::new().cargo_metadata(true).probe(lib) {
                Ok(l) => includes.extend(l.include_paths),
                Err(e) => fail(&format!("pkg-config could not find `{lib}`: {e}"), target),
            }
        }
        includes.sort();
        includes.dedup();

        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let wrappers = out.join("doca_static_fns.c");
        let mut builder = bindgen::Builder::default()
            .header("wrapper.h")
            .clang_arg("-DDOCA_ALLOW_EXPERIMENTAL_API")
            .allowlist_function("doca_.*")
            .allowlist_type("doca_.*")
            .allowlist_var("DOCA_.*")
            // doca_error_t stays an integer newtype: a value the SDK adds
            // later must not be undefined behaviour in Rust.
            .newtype_enum("doca_error")
            .default_enum_style(bindgen::EnumVariation::Consts)
            .wrap_static_fns(true)
            .wrap_static_fns_path(&wrappers)
            .layout_tests(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        for inc in &includes {
            builder = builder.clang_arg(format!("-I{}", inc.display()));
        }
        let bindings = builder.generate().unwrap_or_else(|e| fail(&format!("bindgen failed: {e}"), target));
        bindings.write_to_file(out.join("bindings.rs")).expect("write bindings.rs");

        // The static inline helpers of the headers, compiled into callable
        // wrappers (bindgen's `wrap_static_fns`).
        let mut cc = cc::Build::new();
        cc.file(&wrappers).include(env::current_dir().expect("cwd")).define("DOCA_ALLOW_EXPERIMENTAL_API", None);
        for inc in &includes {
            cc.include(inc);
        }
        cc.compile("doca_sys_static_fns");
    }
}
