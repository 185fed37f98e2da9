//! The Rust function of README.md ("Writing a function"), compiled with the
//! workspace (`cargo build --all-targets`): upper-cases every message in
//! place and hands it on to `rot13`. The test `host-shim/tests/readme.rs`
//! checks that the README shows the code between the markers below.
//!
//!     cargo run -p host-shim --example function -- <runtime_dir>/shimd.sock

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args_os().nth(1).ok_or("usage: function SOCKET")?;
    let socket = std::path::Path::new(&arg);
    // README begin
    use host_shim::{Function, SendError, SendErrorKind};

    let mut f = Function::attach(socket, "acme", "upper")?;
    loop {
        let mut msg = f.recv()?; // spins briefly, then sleeps; fails once host-shimd is gone
        if msg.desc().is_error() {
            f.free(msg)?; // a message of ours came back undelivered: not a call
            continue;
        }
        for k in 0..msg.frags() {
            f.payload_mut(&mut msg, k).make_ascii_uppercase(); // in place, zero copy
        }
        // The descriptor goes into rot13's ring: wait while that is full
        // (back-pressure), free the buffers if it cannot go at all.
        loop {
            match f.send(msg, "rot13") {
                Ok(()) => break,
                Err(SendError { kind: SendErrorKind::Full, msg: Some(back) }) => {
                    msg = back;
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
                Err(e) => {
                    log::warn!("send to rot13: {}", e.kind);
                    if let Some(back) = e.msg {
                        f.free(back)?;
                    }
                    break;
                }
            }
        }
    }
    // README end
}
