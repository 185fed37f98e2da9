//! Records the target triple for `dpu-agent --version`.
fn main() {
    println!("cargo:rustc-env=DNE_TARGET={}", std::env::var("TARGET").unwrap_or_default());
}
