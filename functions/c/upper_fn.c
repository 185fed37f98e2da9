/* Sample DNE function in C: upper-cases every message in place (zero copy)
 * and hands the same buffers on to the next function. An error descriptor
 * (a message of ours that came back undelivered) is freed, not forwarded.
 *
 *   upper_fn SOCKET TENANT FUNCTION NEXT
 *
 * Build:  cc upper_fn.c $(pkg-config --cflags --libs dne-shim) -o upper_fn
 */
#define _DEFAULT_SOURCE /* usleep */
#include <dne_shim.h>
#include <stdio.h>
#include <unistd.h>

static void check(dne_status st, const char *what) {
    if (st != DNE_OK) {
        fprintf(stderr, "upper_fn: %s: %s\n", what, dne_status_str(st));
        _exit(1);
    }
}

/* Frees a message; a failure is logged, not fatal: one bad message (a
 * chain whose link a process sharing the pool rewrote) does not end the
 * function, and the buffers it could not free are reclaimed when it exits. */
static void release(dne_fn *fn, dne_msg *msg) {
    dne_status st = dne_free(fn, msg);
    if (st != DNE_OK)
        fprintf(stderr, "upper_fn: free: %s\n", dne_status_str(st));
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SOCKET TENANT FUNCTION NEXT\n", argv[0]);
        return 2;
    }
    dne_fn *fn = NULL;
    check(dne_attach(argv[1], argv[2], argv[3], &fn), "attach");
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        dne_msg *msg = NULL;
        dne_status st = dne_recv(fn, -1, &msg);
        if (st == DNE_ERR_TIMEOUT)
            continue;
        check(st, "recv");
        if (dne_msg_is_error(msg)) {
            /* A message of ours came back undelivered: not a call, free it. */
            fprintf(stderr, "upper_fn: message %u came back: %s\n", dne_msg_request(msg),
                    dne_error_code_str(dne_msg_error_code(msg)));
            release(fn, msg);
            continue;
        }
        int broken = 0;
        for (uint32_t k = 0; k < dne_msg_frags(msg); k++) {
            uint32_t len = 0;
            uint8_t *p = dne_msg_data(fn, msg, k, &len);
            if (!p) {
                /* A link of the chain leads out of the pool (a process
                 * sharing it rewrote the link): drop the message. */
                broken = 1;
                break;
            }
            for (uint32_t i = 0; i < len; i++)
                if (p[i] >= 'a' && p[i] <= 'z')
                    p[i] = (uint8_t)(p[i] - 'a' + 'A');
        }
        if (broken) {
            fprintf(stderr, "upper_fn: message %u has a broken chain; dropped\n", dne_msg_request(msg));
            release(fn, msg);
            continue;
        }
        /* Back-pressure: retry while the next ring is full; never drop. */
        while ((st = dne_send(fn, &msg, argv[4])) == DNE_ERR_FULL)
            usleep(50);
        if (st != DNE_OK) {
            fprintf(stderr, "upper_fn: send: %s\n", dne_status_str(st));
            if (msg)
                release(fn, msg);
            if (st == DNE_ERR_SHIMD_GONE) {
                /* host-shimd stopped: nothing sent from here on would be
                 * delivered. Exit; the supervisor starts us against the new one. */
                dne_detach(fn);
                return 1;
            }
        }
    }
}
