//! Generates the C header `dne_shim.h` from `src/ffi.rs` (cbindgen) and a
//! build-tree `dne-shim.pc`, both under `OUT_DIR` (`include/`, `pkgconfig/`);
//! the `.pc` links (and sets the rpath to) `target/<profile>/deps`.
//! Installed copies (with the install prefix) are made by the packaging
//! scripts from the same template.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=dne-shim.pc.in");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let include = out.join("include");
    let pkgconfig = out.join("pkgconfig");
    std::fs::create_dir_all(&include).expect("create include dir");
    std::fs::create_dir_all(&pkgconfig).expect("create pkgconfig dir");

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    // Only the FFI module: the header is the C ABI, nothing else.
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(crate_dir.join("src/ffi.rs"))
        .generate()
        .expect("cbindgen could not generate dne_shim.h")
        .write_to_file(include.join("dne_shim.h"));

    // target/<profile>/build/host-shim-<hash>/out -> target/<profile>/deps:
    // where cargo builds libhost_shim.so every time, whether host-shim is
    // built itself or as a dependency (`cargo test -p dne-tests`). The copy
    // in target/<profile> is refreshed only when host-shim is built itself,
    // so linking it could pick a library older than the header.
    let profile = out.ancestors().nth(3).expect("OUT_DIR layout").to_path_buf();
    let libdir = profile.join("deps");
    let pc = std::fs::read_to_string(crate_dir.join("dne-shim.pc.in"))
        .expect("dne-shim.pc.in")
        .replace("@PREFIX@", &profile.display().to_string())
        .replace("@LIBDIR@", &libdir.display().to_string())
        .replace("@INCLUDEDIR@", &include.display().to_string())
        .replace("@RPATH@", &format!("-Wl,-rpath,{} ", libdir.display()))
        .replace("@VERSION@", &std::env::var("CARGO_PKG_VERSION").unwrap_or_default());
    std::fs::write(pkgconfig.join("dne-shim.pc"), pc).expect("write dne-shim.pc");
}
