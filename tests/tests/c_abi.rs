//! The C ABI as a C programmer meets it: C programs built with only the
//! generated `dne_shim.h` and the build-tree `dne-shim.pc`, with warnings
//! as errors, some run against a host-shimd served on a thread of the
//! test. (They are here, not in host-shim, to share `dne_tests::c` with the
//! C sample's tests: host-shim cannot take dne-tests as a dev-dependency,
//! dne-tests depends on it.)

use dne_tests::TempDir;
use dne_tests::c::{Lang, pkg_config};
use host_shim::daemon::{Shimd, socket_path};
use host_shim::ffi::dne_status;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const WATCHDOG: Duration = Duration::from_secs(60);

/// Runs `cmd` to its end within the watchdog; its exit status and output.
fn run(what: &str, cmd: Command) -> (bool, String, String) {
    let out = dne_tests::run(what, cmd, WATCHDOG);
    (out.status.success(), out.stdout, out.stderr)
}

/// Builds `src` (C99, or C++11 when `cxx`) as `name` in `dir` with
/// `-pedantic -pthread` besides the flags of [`dne_tests::c::build`]; the
/// command that runs it.
fn build(dir: &Path, name: &str, src: &str, cxx: bool) -> Command {
    let lang = if cxx { Lang::Cxx11 } else { Lang::C99 };
    let file = dir.join(format!("{name}.{}", lang.ext()));
    std::fs::write(&file, src).unwrap();
    dne_tests::c::build(dir, &file, lang, &["-pedantic", "-pthread"])
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
    let dir = TempDir::new("cabi-consts");
    let statuses: Vec<(String, i32)> = dne_status::ALL.iter().map(|s| (format!("{s:?}"), *s as i32)).collect();
    let codes: Vec<(String, i32)> = wire::ErrorCode::ALL
        .iter()
        .map(|c| (format!("DNE_MSG_ERR_{}", c.as_str().to_uppercase()), i32::from(*c as u8)))
        .collect();
    let names: Vec<String> = statuses.iter().chain(&codes).map(|(n, _)| n.clone()).collect();
    for cxx in [false, true] {
        let cmd = build(dir.path(), if cxx { "consts_cxx" } else { "consts_c" }, &c_printing(&names), cxx);
        let (ok, out, err) = run("constants", cmd);
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

/// host-shimd of node `n0` serving the cluster `text` on a thread until
/// dropped.
struct ShimdThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: TempDir,
}

impl ShimdThread {
    fn start(tag: &str, text: &str) -> Self {
        let dir = TempDir::new(&format!("cabi-{tag}"));
        let text = format!(
            "[[node]]\nname = \"n0\"\naddress = \"127.0.0.1:1\"\nruntime_dir = \"{}\"\n\n{text}",
            dir.path().join("rt").display()
        );
        let cfg = config::Cluster::parse(&text).expect("cluster");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut d = Shimd::new(cfg, "n0").expect("host-shimd");
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                d.poll_once(None, Duration::from_millis(5)).expect("host-shimd round");
            }
        });
        rx.recv_timeout(WATCHDOG).expect("host-shimd started");
        Self { stop, thread: Some(thread), dir }
    }

    fn socket(&self) -> PathBuf {
        socket_path(&self.dir.path().join("rt"))
    }

    /// Builds the C program `src` as `name` and runs it with this
    /// host-shimd's socket as its argument: it must exit cleanly having
    /// printed `done`.
    fn run_to_done(&self, name: &str, src: &str) {
        let dir = TempDir::new(&format!("cabi-{name}-build"));
        let mut cmd = build(dir.path(), name, src, false);
        cmd.arg(self.socket());
        let (ok, out, err) = run(name, cmd);
        assert!(ok && out.contains("done"), "{err}");
    }
}

impl Drop for ShimdThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Tenant `t`: `a`, `b` (a ring of 8) and `c`; buffers enough for each to
/// keep a full allocation cache (32) with messages in flight.
const CLUSTER: &str = "[[tenant]]\nname = \"t\"\nweight = 1\nbuf_size = 4096\nbuffers = 256\nrecv_quota = 8\n\n\
     [[function]]\nname = \"a\"\ntenant = \"t\"\nnode = \"n0\"\n\n\
     [[function]]\nname = \"b\"\ntenant = \"t\"\nnode = \"n0\"\nring_capacity = 8\n\n\
     [[function]]\nname = \"c\"\ntenant = \"t\"\nnode = \"n0\"\n";

/// The C prelude of the programs below: `CHECK(call, status)` fails the
/// program (exit 1, with the line) unless `call` returns `status`.
const PRELUDE: &str = r#"
#include <dne_shim.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define CHECK(call, want) do { \
    dne_status got_ = (call); \
    if (got_ != (want)) { \
        fprintf(stderr, "line %d: %s: %s, want %s\n", __LINE__, #call, \
                dne_status_str(got_), dne_status_str(want)); \
        exit(1); \
    } } while (0)
#define EXPECT(cond) do { if (!(cond)) { \
    fprintf(stderr, "line %d: not %s\n", __LINE__, #cond); exit(1); } } while (0)
"#;

/// Every argument a C caller can get wrong gets its documented status,
/// and the message handles stay where the header says: NULL for each
/// pointer, an empty, too long or non-UTF-8 name, a zero and a huge
/// length, a fragment past the end, `dne_free` without a function (`m`
/// still the caller's), a failed send (`*m` the same handle).
#[test]
fn bad_arguments_get_their_documented_status() {
    let shimd = ShimdThread::start("args", CLUSTER);
    let src = format!(
        "{PRELUDE}{}",
        r#"
static const char LONG[] = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
int main(int argc, char **argv) {
    const char *sock = argv[1];
    dne_fn *f = NULL, *b = NULL;
    dne_msg *m = NULL, *none = NULL;
    uint32_t len = 0;
    EXPECT(argc == 2);
    CHECK(dne_attach(NULL, "t", "a", &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, NULL, "a", &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", NULL, &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", "a", NULL), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", "", &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", LONG, &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", "\xff", &f), DNE_ERR_INVALID_ARG);
    CHECK(dne_attach(sock, "t", "nosuch", &f), DNE_ERR_REFUSED);
    CHECK(dne_attach("/nonexistent/shimd.sock", "t", "a", &f), DNE_ERR_SHIMD);
    EXPECT(f == NULL);
    CHECK(dne_attach(sock, "t", "a", &f), DNE_OK);
    CHECK(dne_attach(sock, "t", "b", &b), DNE_OK);

    CHECK(dne_alloc(NULL, 1, &m), DNE_ERR_INVALID_ARG);
    CHECK(dne_alloc(f, 1, NULL), DNE_ERR_INVALID_ARG);
    CHECK(dne_alloc(f, 0xffffffffu, &m), DNE_ERR_EXHAUSTED);
    EXPECT(m == NULL);
    CHECK(dne_alloc(f, 0, &m), DNE_OK);
    EXPECT(dne_msg_len(m) == 0 && dne_msg_frags(m) == 1);
    EXPECT(dne_msg_data(f, m, 0, &len) != NULL && len == 0);
    CHECK(dne_free(f, m), DNE_OK);
    CHECK(dne_alloc(f, 5000, &m), DNE_OK);
    EXPECT(dne_msg_frags(m) == 2);
    EXPECT(dne_msg_data(f, m, 1, &len) != NULL && len > 0);
    EXPECT(dne_msg_data(f, m, 2, &len) == NULL);
    EXPECT(dne_msg_data(f, m, 0xffffffffu, &len) == NULL);
    EXPECT(dne_msg_data(NULL, m, 0, &len) == NULL);
    EXPECT(dne_msg_data(f, NULL, 0, &len) == NULL);
    EXPECT(dne_msg_data(f, m, 0, NULL) != NULL);
    EXPECT(dne_msg_len(NULL) == 0 && dne_msg_frags(NULL) == 0 && dne_msg_request(NULL) == 0);
    EXPECT(!dne_msg_is_error(NULL) && dne_msg_error_code(NULL) == 0);

    dne_msg *kept = m;
    CHECK(dne_send(NULL, &m, "b"), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, NULL, "b"), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &none, "b"), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &m, NULL), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &m, "\xff"), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &m, ""), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &m, LONG), DNE_ERR_INVALID_ARG);
    CHECK(dne_send(f, &m, "nosuch"), DNE_ERR_UNKNOWN_FUNCTION);
    EXPECT(m == kept && dne_msg_len(m) == 5000);

    /* Without a function to free it with, the message stays the caller's. */
    CHECK(dne_free(NULL, m), DNE_ERR_INVALID_ARG);
    EXPECT(dne_msg_len(m) == 5000);
    CHECK(dne_free(f, m), DNE_OK);
    CHECK(dne_free(f, NULL), DNE_OK);

    /* Fill b's ring: a full ring keeps the handle as it was. */
    for (;;) {
        dne_status st;
        CHECK(dne_alloc(f, 1, &m), DNE_OK);
        kept = m;
        st = dne_send(f, &m, "b");
        if (st == DNE_ERR_FULL) {
            EXPECT(m == kept);
            CHECK(dne_free(f, m), DNE_OK);
            break;
        }
        CHECK(st, DNE_OK);
        EXPECT(m == NULL);
    }
    CHECK(dne_recv(NULL, 0, &m), DNE_ERR_INVALID_ARG);
    CHECK(dne_recv(b, 0, NULL), DNE_ERR_INVALID_ARG);
    CHECK(dne_recv(f, 0, &m), DNE_ERR_TIMEOUT);
    for (int i = 0; i < 8; i++) {
        CHECK(dne_recv(b, 1000, &m), DNE_OK);
        EXPECT(!dne_msg_is_error(m) && dne_msg_len(m) == 1);
        CHECK(dne_free(b, m), DNE_OK);
    }
    CHECK(dne_recv(b, 0, &m), DNE_ERR_TIMEOUT);
    dne_detach(NULL);
    dne_detach(b);
    dne_detach(f);
    printf("done\n");
    return 0;
}
"#
    );
    shimd.run_to_done("args", &src);
}

/// What the header says of threads holds: each thread attaches once and
/// uses its own `dne_fn`, attaches and sends run at once on two threads,
/// and a message handle moves between them (freed or sent by the other
/// thread's attach, of the same pool).
#[test]
fn threads_with_an_attach_each_share_message_handles() {
    let shimd = ShimdThread::start("threads", CLUSTER);
    let src = format!(
        "{PRELUDE}{}",
        r#"
#include <pthread.h>
#define N 200
static const char *sock;
static dne_msg *handed; /* set before pthread_create, read after it */

/* Thread b: attaches on its own, frees the handle main gave it, then
 * receives N messages and frees each with its own attach. */
static void *receiver(void *arg) {
    dne_fn *b = NULL;
    dne_msg *m = NULL;
    (void)arg;
    CHECK(dne_attach(sock, "t", "b", &b), DNE_OK);
    EXPECT(dne_msg_len(handed) == 3);
    CHECK(dne_free(b, handed), DNE_OK);
    for (int i = 0; i < N; i++) {
        CHECK(dne_recv(b, 10000, &m), DNE_OK);
        EXPECT(dne_msg_len(m) == 4 && dne_msg_request(m) == 0);
        CHECK(dne_free(b, m), DNE_OK);
    }
    dne_detach(b);
    return NULL;
}

/* Thread c: attaches while main sends, and sends N messages of its own
 * to a. */
static void *sender(void *arg) {
    dne_fn *c = NULL;
    dne_msg *m = NULL;
    (void)arg;
    CHECK(dne_attach(sock, "t", "c", &c), DNE_OK);
    for (int i = 0; i < N; i++) {
        dne_status st;
        CHECK(dne_alloc(c, 2, &m), DNE_OK);
        while ((st = dne_send(c, &m, "a")) == DNE_ERR_FULL || st == DNE_ERR_NO_INSTANCE)
            ;
        CHECK(st, DNE_OK);
    }
    dne_detach(c);
    return NULL;
}

int main(int argc, char **argv) {
    dne_fn *a = NULL;
    dne_msg *m = NULL;
    pthread_t tb, tc;
    EXPECT(argc == 2);
    sock = argv[1];
    CHECK(dne_attach(sock, "t", "a", &a), DNE_OK);
    CHECK(dne_alloc(a, 3, &handed), DNE_OK);
    EXPECT(pthread_create(&tb, NULL, receiver, NULL) == 0);
    EXPECT(pthread_create(&tc, NULL, sender, NULL) == 0);
    for (int i = 0; i < N; i++) {
        dne_status st;
        CHECK(dne_alloc(a, 4, &m), DNE_OK);
        while ((st = dne_send(a, &m, "b")) == DNE_ERR_FULL || st == DNE_ERR_NO_INSTANCE)
            ;
        CHECK(st, DNE_OK);
    }
    for (int i = 0; i < N; i++) {
        CHECK(dne_recv(a, 10000, &m), DNE_OK);
        EXPECT(dne_msg_len(m) == 2);
        CHECK(dne_free(a, m), DNE_OK);
    }
    EXPECT(pthread_join(tb, NULL) == 0 && pthread_join(tc, NULL) == 0);
    dne_detach(a);
    printf("done\n");
    return 0;
}
"#
    );
    shimd.run_to_done("threads", &src);
}
