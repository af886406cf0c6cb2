/*
 * bastion-agent: the in-sandbox agent of Bastion (PID 1 of every sandbox), in C.
 *
 * It speaks exactly the protocol of ../agent.py (whose module docstring is the
 * reference) but costs a few hundred KiB instead of two Python interpreters, and
 * starts a job with two forks of a tiny static process.  One file, C11 + Linux,
 * nothing beyond libc:   gcc -O2 -static -o bastion-agent bastion-agent.c
 *
 * Process layout inside the sandbox:
 *
 *     PID 1   reaper          reaps orphans; exits (ending the sandbox) if the server dies
 *     └─ agent server         one epoll loop, no threads; listens on $BASTION_SOCKET_DIR/agent.sock
 *        └─ supervisor (one per job)  child subreaper (own session in pipe mode)
 *           └─ the job        as $BASTION_UID/$BASTION_GID, no supplementary groups
 *
 * Wire protocol, one Unix stream connection per job, frames of
 * `type (1 byte) | length (4 bytes, big endian) | payload`:
 *   J  a JSON object (requests from the server, events from the agent)
 *   O / E  stdout / stderr bytes (agent -> server)
 *   I  stdin bytes (server -> agent; pty input)
 * Requests: {"op":"exec","argv","env","cwd","timeout","pty","rows","cols",
 * "user","stdin","rlimits"}, then optionally {"op":"kill","signal"},
 * {"op":"resize","rows","cols"}, {"op":"close_stdin"} and input; {"op":"ping"}.
 *   user     "root": the job runs as the sandbox's root; else as $BASTION_UID.
 *   stdin    true: the job's stdin is a pipe fed by I frames (else /dev/null, or the
 *            terminal with pty); close_stdin closes it (with a pty: sends ^D).
 *   rlimits  {"cpu_seconds", "file_size_bytes", "open_files"}: per-process kernel
 *            limits of the job (lowered only, never raised).
 *   The exec frame may carry descriptors (SCM_RIGHTS, at most MAX_CG_FDS): each is a
 *   cgroup's cgroup.procs, opened by the server; the supervisor writes "0" to each
 *   before the job starts, so the job's whole tree lives in those cgroups.
 *   kill     without "signal" (or SIGKILL): the whole tree dies; another signal is
 *            sent to every process of the tree, which may handle it.
 * Events: {"event":"started","pid"}, output frames, and last
 * {"event":"exit","exit_code","signal","timed_out","error","kill_signal","usage"},
 * usage = {"wall_us","user_cpu_us","system_cpu_us","peak_rss_kb"} of the job's main
 * process and every descendant reaped before it ended (null if the supervisor died).
 * Started goes in the same send as the job's first frame, or by itself once the job
 * has run STARTED_DELAY_NS (2 ms) without one: a short job's events wake the server once.
 * Closing the connection kills the job's whole tree, unless the job is persistent.
 *
 * oom_kills_before (exec, a number): kept with the job and sent back in its exit event
 * (also the one kept for attach): the server's count of the sandbox cgroup's OOM kills
 * when the job started, for its verdict even if a restarted server takes the job up.
 *
 * Kept connections: exec with "keep_open": true asks for the connection to outlive the
 * job.  Its exit event then carries "keep_open": true, and once the job's conversation
 * is over (after the exit event; for a persistent job after "forget") the connection
 * takes a new request (exec, attach, ping) as a new one would, without a connect per
 * job.  Control frames and input sent for the job before its exit event was read are
 * dropped there.  A connection that broke the protocol is closed, never kept.
 *
 * Persistent jobs (what lets a job outlive a restart of the server): exec with
 * "persist": true, "job_id" (1-64 of [A-Za-z0-9_-], unique among the agent's live
 * persistent jobs) and "spool_bytes" (per stream; default 16 MiB); never with a pty.
 *   - Its output is also spooled, up to spool_bytes per stream (what is past that is
 *     only counted), as records of the wire's frame format (so both streams keep their
 *     order), in a file of $BASTION_SPOOL_DIR (default /var/lib/bastion-agent/spool,
 *     made 0700) unlinked as soon as it is made: it lives on the session's own disk
 *     exactly as long as the agent holds it, nobody else opens it, and nothing is left
 *     behind when the sandbox stops.  A job that prints nothing makes no file.
 *   - A closed connection does not kill it: it runs on, its output read as it comes
 *     (into the spool alone), its timeout counting from its start as before.
 *   - Its exit event also carries "output_bytes": {"stdout","stderr"}, every byte the
 *     job wrote, and is kept: after it the connection stays open until the server
 *     sends {"op":"forget"} (it has recorded the end); the agent then drops the job
 *     and closes.  A connection that closes without it leaves the job to be attached.
 *   - {"op":"attach","job_id","stdout_offset","stderr_offset"} on a new connection
 *     takes the job over (an old connection of it is closed): the spool is replayed
 *     from the start, minus the first *_offset bytes of each stream (what the server
 *     has), then the job goes on live (control frames and input as after exec), or,
 *     if it has ended, its exit event is sent again.  An id the agent does not know
 *     (never run here, forgotten, or run by an agent of an earlier start of the
 *     sandbox) gets {"event":"exit","exit_code":null,"error":"unknown_job",...}.
 *
 * Killing a tree: the agent sends SIGUSR1 to the supervisor ("kill mode": from now on
 * it stays until it has no child left, instead of leaving as soon as the job's main
 * process exits), then sweeps /proc for the supervisor's descendants and SIGKILLs
 * them until the supervisor, having reaped its last child, exits by itself.  A
 * subreaper inherits every orphan of its tree, so nothing forked mid-sweep escapes.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* A sanitizer cannot follow a child onto a borrowed stack: such builds fork instead. */
#if defined(__SANITIZE_ADDRESS__)
#define SPAWN_WITH_FORK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define SPAWN_WITH_FORK 1
#endif
#endif

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif

#define FRAME_HDR 5
#define MAX_FRAME (16u * 1024 * 1024)
#define READ_CHUNK (256 * 1024)
#define SOCK_READ (64 * 1024)
#define DRAIN_NS (50LL * 1000000)  /* output drained after the main process exits */
#define SWEEP_NS (2LL * 1000000)   /* pause between two sweeps of a tree */
/* The started event waits this long for the job's first output or its exit, to go in
 * the same send: each send wakes the server, the dearest part of a short job.  Short:
 * until it comes, the server cannot tell the job's processes in a process list (a
 * client's run, then its list, is a few ms apart even on loopback). */
#define STARTED_DELAY_NS (2LL * 1000000)
#define MAX_SWEEPS 200
#define MAX_DEPTH 64               /* JSON nesting */
#define SOCKET_NAME "agent.sock"
#define DEFAULT_SOCKET_DIR "/run/bastion"
#define DEFAULT_PATH "/bin:/usr/bin" /* Python's os.defpath, as execvpe uses it */
#define MAX_CG_FDS 4
#define DEFAULT_SPOOL_DIR "/var/lib/bastion-agent/spool"
#define MAX_JOB_ID 64
#define DEFAULT_SPOOL_BYTES (16LL * 1024 * 1024) /* per stream, as the server's default cap */
#define ERR_LIMITS (1 << 20) /* on the exec error pipe: placing the job in its cgroups */

static uid_t g_uid;
static gid_t g_gid;
static const char *g_home;
static const char *g_spool_dir;
/* /proc as it was when the sandbox started, held open: a timeout's sweep must find
 * the job's tree even if the mount at /proc were later taken away or covered. */
static int g_proc = -1;
static int g_ep = -1, g_devnull = -1, g_listen = -1, g_sigfd = -1, g_reserve = -1;
static unsigned char g_buf[READ_CHUNK];
static volatile sig_atomic_t g_killmode; /* supervisor only */

static void logmsg(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    if (write(2, "bastion-agent: ", 15) < 0 || write(2, line, (size_t)n) < 0) {
        /* nowhere else to complain */
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ------------------------------------------------------------------ byte buffers */

struct buf {
    char *d;
    size_t off, len, cap; /* live bytes are d[off..len) */
    bool oom;
};

static size_t buf_avail(const struct buf *b) { return b->len - b->off; }

static void buf_free(struct buf *b) {
    free(b->d);
    *b = (struct buf){0};
}

static bool buf_put(struct buf *b, const void *p, size_t n) {
    if (b->oom)
        return false;
    if (b->cap - b->len < n && b->off) {
        memmove(b->d, b->d + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->cap - b->len < n) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        if (cap < b->len + n)
            cap = b->len + n;
        char *d = realloc(b->d, cap);
        if (!d) {
            b->oom = true;
            return false;
        }
        b->d = d;
        b->cap = cap;
    }
    if (n)
        memcpy(b->d + b->len, p, n);
    b->len += n;
    return true;
}

static void buf_puts(struct buf *b, const char *s) { buf_put(b, s, strlen(s)); }

static void buf_printf(struct buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof tmp)
        buf_put(b, tmp, (size_t)n);
    else
        b->oom = true;
}

/* ------------------------------------------------------------------ JSON */

/* Length of the well-formed UTF-8 sequence at p (1..4), or 0. */
static size_t utf8_len(const unsigned char *p, size_t n) {
    unsigned char c = p[0];
    if (c < 0x80)
        return 1;
    size_t len = c < 0xC2 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF5 ? 4 : 0;
    if (!len || len > n)
        return 0;
    for (size_t i = 1; i < len; i++)
        if ((p[i] & 0xC0) != 0x80)
            return 0;
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] >= 0xA0) ||
        (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] >= 0x90))
        return 0; /* overlong, surrogate, beyond U+10FFFF */
    return len;
}

/* A JSON string: escapes as Python's json, ASCII-only, and a byte that is no
 * UTF-8 as its surrogate escape (\udcXX), as Python writes an undecodable byte. */
static void jw_str(struct buf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    buf_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        char esc[8] = {'\\', 0};
        size_t elen = 2;
        if (c == '"' || c == '\\')
            esc[1] = (char)c;
        else if (c == '\n')
            esc[1] = 'n';
        else if (c == '\r')
            esc[1] = 'r';
        else if (c == '\t')
            esc[1] = 't';
        else if (c == '\b')
            esc[1] = 'b';
        else if (c == '\f')
            esc[1] = 'f';
        else if (c < 0x20 || c >= 0x80) {
            size_t len = c >= 0x80 ? utf8_len(p + i, n - i) : 0;
            if (len) {
                buf_put(b, p + i, len);
                i += len;
                continue;
            }
            memcpy(esc, c < 0x20 ? "\\u00" : "\\udc", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            elen = 6;
        } else {
            size_t j = i + 1; /* a run of plain characters in one go */
            while (j < n && p[j] >= 0x20 && p[j] < 0x80 && p[j] != '"' && p[j] != '\\')
                j++;
            buf_put(b, p + i, j - i);
            i = j;
            continue;
        }
        buf_put(b, esc, elen);
        i++;
    }
    buf_put(b, "\"", 1);
}

enum { JNULL, JFALSE, JTRUE, JNUM, JSTR, JARR, JOBJ };

struct jv {
    int t;
    double num;
    char *s;              /* JSTR: decoded bytes, NUL-terminated (may hold NULs) */
    size_t n;             /* JSTR: length; JARR/JOBJ: number of children */
    char *key;            /* as a member of an object: its name */
    size_t keyn;
    struct jv *kids, *tail, *next;
};

/* Everything one request parses into comes from one arena, freed at once. */
struct arena_blk {
    struct arena_blk *prev;
    size_t used, cap;
    max_align_t data[];
};
struct arena {
    struct arena_blk *top;
};

static void *arena_alloc(struct arena *a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    if (!a->top || a->top->cap - a->top->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        struct arena_blk *b = malloc(sizeof *b + cap);
        if (!b)
            return NULL;
        b->prev = a->top;
        b->used = 0;
        b->cap = cap;
        a->top = b;
    }
    void *p = (char *)a->top->data + a->top->used;
    a->top->used += n;
    return p;
}

static void arena_free(struct arena *a) {
    while (a->top) {
        struct arena_blk *prev = a->top->prev;
        free(a->top);
        a->top = prev;
    }
}

struct jparse {
    const unsigned char *p, *end;
    struct arena *a;
    const char *err;
    int depth;
};

static void *jfail(struct jparse *j, const char *msg) {
    if (!j->err)
        j->err = msg;
    return NULL;
}

static void jws(struct jparse *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex4(const unsigned char *p) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        int c = p[i], d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = v * 16 + d;
    }
    return v;
}

static char *put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) {
        *o++ = (char)cp;
    } else if (cp < 0x800) {
        *o++ = (char)(0xC0 | cp >> 6);
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (char)(0xE0 | cp >> 12);
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (char)(0xF0 | cp >> 18);
        *o++ = (char)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (char)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (char)(0x80 | (cp & 0x3F));
    }
    return o;
}

/* A string at j->p (its opening quote); decoded into the arena. */
static bool jstring(struct jparse *j, char **out, size_t *outn) {
    const unsigned char *q = ++j->p, *e = q;
    while (e < j->end && *e != '"')
        e += *e == '\\' && e + 1 < j->end ? 2 : 1;
    if (e >= j->end)
        return jfail(j, "unterminated string"), false;
    /* Decoding never grows: an escape is at least as long as what it stands for. */
    char *o = arena_alloc(j->a, (size_t)(e - q) + 1), *start = o;
    if (!o)
        return jfail(j, "out of memory"), false;
    while (q < e) {
        unsigned char c = *q;
        if (c == '\\') {
            c = q[1];
            q += 2;
            switch (c) {
            case '"': case '\\': case '/': *o++ = (char)c; continue;
            case 'b': *o++ = '\b'; continue;
            case 'f': *o++ = '\f'; continue;
            case 'n': *o++ = '\n'; continue;
            case 'r': *o++ = '\r'; continue;
            case 't': *o++ = '\t'; continue;
            case 'u': break;
            default: return jfail(j, "invalid escape in string"), false;
            }
            int cp = e - q >= 4 ? hex4(q) : -1;
            if (cp < 0)
                return jfail(j, "invalid \\u escape in string"), false;
            q += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                int lo = e - q >= 6 && q[0] == '\\' && q[1] == 'u' ? hex4(q + 2) : -1;
                if (lo < 0xDC00 || lo > 0xDFFF)
                    return jfail(j, "lone surrogate in string"), false;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                q += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                /* Python's surrogate escape of an undecodable byte: that byte. */
                if (cp < 0xDC80 || cp > 0xDCFF)
                    return jfail(j, "lone surrogate in string"), false;
                *o++ = (char)(cp - 0xDC00);
                continue;
            }
            o = put_utf8(o, (unsigned)cp);
        } else if (c < 0x20) {
            return jfail(j, "control character in string"), false;
        } else if (c == 0xED && e - q >= 3 && (q[1] == 0xB2 || q[1] == 0xB3) &&
                   (q[2] & 0xC0) == 0x80) {
            /* U+DC80..U+DCFF encoded raw: Python reads the payload with
             * "surrogatepass", so this too is the escape of one byte. */
            *o++ = (char)(((q[1] & 0x01) << 6 | (q[2] & 0x3F)) + 0x80);
            q += 3;
        } else {
            size_t len = utf8_len(q, (size_t)(e - q));
            if (!len)
                return jfail(j, "invalid UTF-8 in string"), false;
            memcpy(o, q, len);
            o += len;
            q += len;
        }
    }
    *o = 0;
    *out = start;
    *outn = (size_t)(o - start);
    j->p = e + 1;
    return true;
}

static bool jdigits(struct jparse *j) {
    const unsigned char *s = j->p;
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
        j->p++;
    return j->p > s;
}

static bool jnumber(struct jparse *j, double *out) {
    const unsigned char *s = j->p;
    if (*j->p == '-')
        j->p++;
    if (j->p < j->end && *j->p == '0')
        j->p++;
    else if (j->p >= j->end || *j->p < '1' || *j->p > '9' || !jdigits(j))
        return jfail(j, "invalid number"), false;
    if (j->p < j->end && *j->p == '.') {
        j->p++;
        if (!jdigits(j))
            return jfail(j, "invalid number"), false;
    }
    if (j->p < j->end && (*j->p == 'e' || *j->p == 'E')) {
        j->p++;
        if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
            j->p++;
        if (!jdigits(j))
            return jfail(j, "invalid number"), false;
    }
    char tmp[512];
    size_t n = (size_t)(j->p - s);
    if (n >= sizeof tmp)
        return jfail(j, "number too long"), false;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    *out = strtod(tmp, NULL);
    return true;
}

static bool jword(struct jparse *j, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n))
        return jfail(j, "invalid literal"), false;
    j->p += n;
    return true;
}

static struct jv *jvalue(struct jparse *j) {
    jws(j);
    if (j->p >= j->end)
        return jfail(j, "unexpected end of JSON");
    struct jv *v = arena_alloc(j->a, sizeof *v);
    if (!v)
        return jfail(j, "out of memory");
    memset(v, 0, sizeof *v);
    unsigned char c = *j->p;
    if (c == '{' || c == '[') {
        if (++j->depth > MAX_DEPTH)
            return jfail(j, "JSON nested too deeply");
        bool obj = c == '{';
        char close = obj ? '}' : ']';
        v->t = obj ? JOBJ : JARR;
        j->p++;
        jws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
        } else {
            for (;;) {
                char *key = NULL;
                size_t keyn = 0;
                if (obj) {
                    jws(j);
                    if (j->p >= j->end || *j->p != '"')
                        return jfail(j, "expected a member name");
                    if (!jstring(j, &key, &keyn))
                        return NULL;
                    jws(j);
                    if (j->p >= j->end || *j->p != ':')
                        return jfail(j, "expected ':'");
                    j->p++;
                }
                struct jv *kid = jvalue(j);
                if (!kid)
                    return NULL;
                kid->key = key;
                kid->keyn = keyn;
                if (v->tail)
                    v->tail->next = kid;
                else
                    v->kids = kid;
                v->tail = kid;
                v->n++;
                jws(j);
                if (j->p < j->end && *j->p == ',') {
                    j->p++;
                    continue;
                }
                if (j->p < j->end && *j->p == (unsigned char)close) {
                    j->p++;
                    break;
                }
                return jfail(j, obj ? "expected ',' or '}'" : "expected ',' or ']'");
            }
        }
        j->depth--;
    } else if (c == '"') {
        v->t = JSTR;
        if (!jstring(j, &v->s, &v->n))
            return NULL;
    } else if (c == 't') {
        v->t = JTRUE;
        if (!jword(j, "true"))
            return NULL;
    } else if (c == 'f') {
        v->t = JFALSE;
        if (!jword(j, "false"))
            return NULL;
    } else if (c == 'n') {
        v->t = JNULL;
        if (!jword(j, "null"))
            return NULL;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        v->t = JNUM;
        if (!jnumber(j, &v->num))
            return NULL;
    } else {
        return jfail(j, "unexpected character");
    }
    return v;
}

static struct jv *jparse(struct arena *a, const void *p, size_t n, const char **err) {
    struct jparse j = {.p = p, .end = (const unsigned char *)p + n, .a = a};
    struct jv *v = jvalue(&j);
    if (v) {
        jws(&j);
        if (j.p != j.end)
            v = jfail(&j, "extra data after the JSON value");
    }
    *err = j.err;
    return v;
}

/* The member `key` of an object (the last one, as Python's dict keeps). */
static struct jv *jget(const struct jv *o, const char *key) {
    size_t n = strlen(key);
    struct jv *found = NULL;
    for (struct jv *k = o->kids; k; k = k->next)
        if (k->keyn == n && !memcmp(k->key, key, n))
            found = k;
    return found;
}

static bool jtruthy(const struct jv *v) {
    if (!v)
        return false;
    switch (v->t) {
    case JTRUE: return true;
    case JNUM: return v->num != 0;
    case JSTR: case JARR: case JOBJ: return v->n > 0;
    default: return false;
    }
}

static bool jis_str(const struct jv *v, const char *s) {
    return v && v->t == JSTR && v->n == strlen(s) && !memcmp(v->s, s, v->n);
}

/* A C string: a JSON string without NUL bytes. */
static bool jcstr(const struct jv *v) { return v && v->t == JSTR && strlen(v->s) == v->n; }

/* ------------------------------------------------------------------ sessions */

/* W_OUT: the pty master (also the input side of a pty); W_IN: a piped stdin. */
enum { W_SOCK, W_OUT, W_ERR, W_STATUS, W_EXECERR, W_IN, W_N };

/* What the supervisor writes on the status pipe when the job's main process ends. */
struct job_status {
    int32_t code; /* exit code, or -signal */
    int32_t pad;
    int64_t utime_us, stime_us, maxrss_kb;
};
enum { JOB_NONE, JOB_STARTING, JOB_RUNNING, JOB_DONE };

struct sess;
struct watch {
    struct sess *s;
    int fd, kind;
    uint32_t ev; /* the events epoll watches for; 0: not registered */
    bool eof;    /* output: at its end, no longer watched, but kept open until the job ends */
};

struct sess {
    struct sess *next, *prev;
    struct watch w[W_N];
    struct buf in;   /* bytes from the socket, not yet taken as frames */
    struct buf out;  /* frames the socket did not take yet (never more than one chunk) */
    struct buf pend; /* stdin the pty did not take yet (never more than one frame) */
    int job;
    bool closing;    /* the last event is queued: close once it is sent */
    bool keep_open;  /* exec with "keep_open": the connection outlives the job */
    bool handed;     /* a kept connection waiting for its next request */
    bool no_input;   /* a bad control frame: read no more */
    bool pty, have_status, timed_out, killed, killing, sup_alive, dead;
    bool has_timeout, has_deadline;
    bool have_usage;
    bool started_pending; /* the started event is owed (see STARTED_DELAY_NS) */
    int64_t started_due;
    pid_t sup;
    int status;      /* as the supervisor reports it: exit code, or -signal */
    int kill_signal; /* the signal a kill request asked for (0: none) */
    int cg_fds[MAX_CG_FDS], ncg; /* cgroup.procs descriptors that came with exec */
    struct job_status usage;
    int64_t started_ns, ended_ns;
    int sweeps;
    int64_t timeout_ns, deadline, drain_until, next_sweep;
    char *argv0;     /* for an exec failure's message */
    char *message;   /* for the exit event, after a bad control frame */
    /* A persistent job (exec with "persist"): it outlives its connection, its output
     * is spooled (to an unlinked file, created with the first byte), and its exit
     * event is kept until the server forgets it. */
    bool persist, forgotten, replaying, spool_broken;
    char job_id[MAX_JOB_ID + 1];
    int spool_fd;
    int64_t spool_cap;          /* bytes kept per stream */
    int64_t spool_kept[2];      /* stdout, stderr: bytes in the spool */
    int64_t produced[2];        /* stdout, stderr: every byte the job wrote */
    int64_t spool_size;         /* the spool file's length */
    int64_t replay_at;          /* attach: where in the spool the replay is */
    int64_t replay_skip[2];     /* attach: bytes of each stream the server has already */
    struct buf exit_ev;         /* the exit event's payload, once the job ended */
    int64_t oom_before;         /* exec's "oom_kills_before", echoed at the exit; -1: none */
};

static struct sess *g_sessions;
static struct watch g_wlisten = {.fd = -1, .kind = -1}, g_wsig = {.fd = -1, .kind = -2};

static void wset(struct watch *w, uint32_t ev) {
    if (w->fd < 0 || w->ev == ev)
        return;
    if (!ev) {
        epoll_ctl(g_ep, EPOLL_CTL_DEL, w->fd, NULL);
    } else {
        struct epoll_event e = {.events = ev, .data.ptr = w};
        if (epoll_ctl(g_ep, w->ev ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, w->fd, &e) < 0) {
            logmsg("epoll_ctl: %s", strerror(errno));
            return;
        }
    }
    w->ev = ev;
}

static void wclose(struct watch *w) {
    if (w->fd < 0)
        return;
    wset(w, 0); /* before close: a forked copy of the fd would keep it registered */
    close(w->fd);
    w->fd = -1;
}

static bool sock_open(const struct sess *s) { return s->w[W_SOCK].fd >= 0; }

/* Whether frames from the socket are taken now: the request; a running job's control
 * frames (not while its input waits); a persistent job's "forget" once it ended. */
static bool takes_frames(const struct sess *s) {
    return sock_open(s) && !s->closing && !s->no_input &&
           (s->job == JOB_NONE || (s->job == JOB_RUNNING && !buf_avail(&s->pend)) ||
            (s->job == JOB_DONE && s->persist));
}

/* What each descriptor of a session waits for, from the session's state. */
static void update(struct sess *s) {
    if (s->dead)
        return;
    bool queued = buf_avail(&s->out) > 0;
    if (sock_open(s)) {
        bool reading = takes_frames(s);
        /* Always registered: a hang-up is seen even while nothing is read (once the
         * last event is queued, only a full hang-up counts: the peer may still read). */
        wset(&s->w[W_SOCK], (s->closing ? 0 : EPOLLRDHUP) | (reading ? EPOLLIN : 0) |
                                (queued ? EPOLLOUT : 0));
    }
    /* Backpressure: no output is read while the socket has not taken the last chunk
     * (nor while a replay of the spool runs); a detached persistent job's output goes
     * to its spool alone, as fast as it comes. */
    bool relay = s->job == JOB_RUNNING && !s->replaying &&
                 (sock_open(s) ? !queued : s->persist);
    bool pending = buf_avail(&s->pend) > 0;
    wset(&s->w[W_OUT], s->w[W_OUT].eof ? 0
                       : (relay ? EPOLLIN : 0) | (s->pty && pending ? EPOLLOUT : 0));
    wset(&s->w[W_IN], !s->pty && pending ? EPOLLOUT : 0);
    wset(&s->w[W_ERR], relay && !s->w[W_ERR].eof ? EPOLLIN : 0);
    wset(&s->w[W_STATUS], s->job == JOB_RUNNING ? EPOLLIN : 0);
    wset(&s->w[W_EXECERR], s->job == JOB_STARTING ? EPOLLIN : 0);
}

static void close_sock(struct sess *s) {
    wclose(&s->w[W_SOCK]);
    s->started_pending = false; /* (an attach learns no pid: it never did) */
    buf_free(&s->in);
    buf_free(&s->out);
    s->closing = false;
}

/* A new session on connection fd (NULL: out of memory). */
static struct sess *new_sess(int fd) {
    struct sess *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    for (int k = 0; k < W_N; k++)
        s->w[k] = (struct watch){.s = s, .fd = -1, .kind = k};
    s->w[W_SOCK].fd = fd;
    s->spool_fd = -1;
    s->oom_before = -1;
    s->next = g_sessions;
    if (g_sessions)
        g_sessions->prev = s;
    g_sessions = s;
    return s;
}

static void process_input(struct sess *s);
static void after(struct sess *s);

/* The job's conversation is over and everything queued is sent: close the connection,
 * or, kept open, hand it (with what the server sent past the job's last frame) to a
 * new session that waits for the next request.  Never a connection that broke the
 * protocol: that one is not trusted again. */
static void end_conn(struct sess *s) {
    if (!s->keep_open || s->no_input) {
        close_sock(s);
        return;
    }
    struct sess *t = new_sess(s->w[W_SOCK].fd);
    if (!t) {
        logmsg("out of memory");
        close_sock(s);
        return;
    }
    wset(&s->w[W_SOCK], 0);
    s->w[W_SOCK].fd = -1;
    t->in = s->in;
    s->in = (struct buf){0};
    buf_free(&s->out);
    s->closing = false;
    t->handed = true;
    update(t);
    process_input(t);
    after(t);
}

static void start_kill(struct sess *s);

/* The server went away (or broke the protocol beyond repair): nobody owns this job,
 * but a persistent one, which runs on (spooled) until it is attached again. */
static void disconnect(struct sess *s) {
    close_sock(s);
    s->replaying = false;
    if (s->persist)
        return;
    if (s->job == JOB_RUNNING) {
        wclose(&s->w[W_OUT]);
        wclose(&s->w[W_ERR]);
        wclose(&s->w[W_IN]);
        buf_free(&s->pend);
        start_kill(s);
    }
    /* JOB_STARTING: killed as soon as it has started (see on_execerr). */
}

/* Send the iov in one sendmsg; the socket is non-blocking and what it does not take
 * waits in s->out (the caller stops reading output until that is sent). */
static void send_iov(struct sess *s, struct iovec *iov, int cnt) {
    if (!sock_open(s))
        return;
    size_t sent = 0;
    if (!buf_avail(&s->out)) {
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t w = sendmsg(s->w[W_SOCK].fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                disconnect(s);
                return;
            }
            w = 0;
        }
        sent = (size_t)w;
    }
    for (int i = 0; i < cnt; i++) {
        if (sent >= iov[i].iov_len) {
            sent -= iov[i].iov_len;
            continue;
        }
        buf_put(&s->out, (const char *)iov[i].iov_base + sent, iov[i].iov_len - sent);
        sent = 0;
    }
    if (s->out.oom) {
        logmsg("out of memory");
        disconnect(s);
    }
}

static void frame_header(unsigned char h[FRAME_HDR], char kind, size_t n) {
    h[0] = (unsigned char)kind;
    h[1] = (unsigned char)(n >> 24);
    h[2] = (unsigned char)(n >> 16);
    h[3] = (unsigned char)(n >> 8);
    h[4] = (unsigned char)n;
}

struct started_frame {
    unsigned char h[FRAME_HDR];
    char json[64];
};

/* The owed started event as the first two iovs (it is no longer owed after): 0 if it
 * was not owed. */
static int take_started(struct sess *s, struct started_frame *f, struct iovec *iov) {
    if (!s->started_pending)
        return 0;
    s->started_pending = false;
    int len = snprintf(f->json, sizeof f->json, "{\"event\":\"started\",\"pid\":%d}",
                       (int)s->sup);
    frame_header(f->h, 'J', (size_t)len);
    iov[0] = (struct iovec){f->h, FRAME_HDR};
    iov[1] = (struct iovec){f->json, (size_t)len};
    return 2;
}

/* Queue or send one frame, after the started event if it is owed (the same send). */
static void send_frame(struct sess *s, char kind, const void *data, size_t n) {
    struct started_frame started;
    unsigned char h[FRAME_HDR];
    struct iovec iov[4];
    int cnt = take_started(s, &started, iov);
    frame_header(h, kind, n);
    iov[cnt++] = (struct iovec){h, FRAME_HDR};
    iov[cnt++] = (struct iovec){(void *)data, n};
    send_iov(s, iov, cnt);
}

/* The started event, if still owed: by itself (the job ran STARTED_DELAY_NS quietly). */
static void send_started(struct sess *s) {
    struct started_frame started;
    struct iovec iov[2];
    int cnt = take_started(s, &started, iov);
    if (cnt)
        send_iov(s, iov, cnt);
}

static void send_json(struct sess *s, struct buf *b) {
    if (b->oom)
        logmsg("out of memory");
    else
        send_frame(s, 'J', b->d, b->len);
    buf_free(b);
}

/* Close the connection once everything queued is sent (a persistent job's stays open
 * until the server forgets the job: then it knows the exit event was recorded). */
static void finish_conn(struct sess *s) {
    if (!sock_open(s) || (s->persist && !s->forgotten))
        return;
    s->closing = true;
    if (!buf_avail(&s->out))
        end_conn(s);
}

static void send_exit(struct sess *s, bool has_code, int code, int sig, bool timed_out,
                      const char *error, const char *message) {
    struct buf b = {0};
    buf_puts(&b, "{\"event\":\"exit\",\"exit_code\":");
    if (has_code)
        buf_printf(&b, "%d", code);
    else
        buf_puts(&b, "null");
    buf_puts(&b, ",\"signal\":");
    if (sig)
        buf_printf(&b, "%d", sig);
    else
        buf_puts(&b, "null");
    buf_puts(&b, timed_out ? ",\"timed_out\":true,\"error\":" : ",\"timed_out\":false,\"error\":");
    if (error)
        jw_str(&b, error, strlen(error));
    else
        buf_puts(&b, "null");
    if (message) {
        buf_puts(&b, ",\"message\":");
        jw_str(&b, message, strlen(message));
    }
    if (s->kill_signal)
        buf_printf(&b, ",\"kill_signal\":%d", s->kill_signal);
    if (s->have_usage) {
        buf_printf(&b, ",\"usage\":{\"wall_us\":%lld,", (long long)((s->ended_ns - s->started_ns) / 1000));
        buf_printf(&b, "\"user_cpu_us\":%lld,", (long long)s->usage.utime_us);
        buf_printf(&b, "\"system_cpu_us\":%lld,", (long long)s->usage.stime_us);
        buf_printf(&b, "\"peak_rss_kb\":%lld}", (long long)s->usage.maxrss_kb);
    }
    if (s->oom_before >= 0)
        buf_printf(&b, ",\"oom_kills_before\":%lld", (long long)s->oom_before);
    if (s->persist) {
        buf_printf(&b, ",\"output_bytes\":{\"stdout\":%lld,", (long long)s->produced[0]);
        buf_printf(&b, "\"stderr\":%lld}", (long long)s->produced[1]);
    }
    if (s->persist && !b.oom) { /* sent again to whoever attaches until it is forgotten */
        buf_free(&s->exit_ev);
        buf_put(&s->exit_ev, b.d, b.len);
        buf_puts(&s->exit_ev, "}");
    }
    /* The connection is handed on after this event (see end_conn). */
    buf_puts(&b, s->keep_open && !s->no_input ? ",\"keep_open\":true}" : "}");
    send_json(s, &b);
}

static void start_failed(struct sess *s, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    send_exit(s, false, 0, 0, false, "start_failed", msg);
    finish_conn(s);
}

static void send_event_pid(struct sess *s, const char *event, pid_t pid) {
    struct buf b = {0};
    buf_printf(&b, "{\"event\":\"%s\",\"pid\":%d}", event, (int)pid);
    send_json(s, &b);
}

/* ------------------------------------------------------------------ persistent jobs */

/* The live persistent job of that id, or NULL. */
static struct sess *find_job(const char *job_id) {
    for (struct sess *s = g_sessions; s; s = s->next)
        if (!s->dead && s->persist && !s->forgotten && !strcmp(s->job_id, job_id))
            return s;
    return NULL;
}

/* mkdir -p, each directory it makes 0700 (root's alone). */
static void make_dirs(const char *dir) {
    char path[PATH_MAX];
    size_t n = strlen(dir);
    if (n >= sizeof path)
        return;
    memcpy(path, dir, n + 1);
    for (char *p = path + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        mkdir(path, 0700);
        *p = '/';
    }
    mkdir(path, 0700);
}

/* The job's spool: a file unlinked as soon as it is made, so that it goes with the
 * agent (with the sandbox) and nobody else ever opens it. */
static bool spool_open(struct sess *s) {
    char path[PATH_MAX];
    if ((size_t)snprintf(path, sizeof path, "%s/%s", g_spool_dir, s->job_id) >= sizeof path)
        return false;
    int flags = O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC;
    int fd = open(path, flags, 0600);
    if (fd < 0 && errno == ENOENT) {
        make_dirs(g_spool_dir);
        fd = open(path, flags, 0600);
    }
    if (fd < 0) {
        logmsg("job %s: cannot spool its output in %s: %s", s->job_id, g_spool_dir,
               strerror(errno));
        return false;
    }
    unlink(path);
    s->spool_fd = fd;
    return true;
}

/* Keep a persistent job's output (up to spool_cap bytes per stream; the rest is only
 * counted), as records of the wire's own frame format. */
static void spool(struct sess *s, int stream, const void *data, size_t n) {
    s->produced[stream] += (int64_t)n;
    int64_t room = s->spool_cap - s->spool_kept[stream];
    size_t keep = room <= 0 ? 0 : (int64_t)n < room ? n : (size_t)room;
    if (!keep || s->spool_broken)
        return;
    if (s->spool_fd < 0 && !spool_open(s)) {
        s->spool_broken = true;
        return;
    }
    unsigned char h[FRAME_HDR] = {stream ? 'E' : 'O', (unsigned char)(keep >> 24),
                                  (unsigned char)(keep >> 16), (unsigned char)(keep >> 8),
                                  (unsigned char)keep};
    struct iovec iov[2] = {{h, FRAME_HDR}, {(void *)data, keep}};
    ssize_t w = pwritev(s->spool_fd, iov, 2, s->spool_size);
    if (w != (ssize_t)(FRAME_HDR + keep)) { /* the session's disk is full: keep no more */
        logmsg("job %s: spool write failed: %s", s->job_id, w < 0 ? strerror(errno) : "short");
        if (ftruncate(s->spool_fd, s->spool_size) < 0) {
            /* the replay stops at spool_size all the same */
        }
        s->spool_broken = true;
        return;
    }
    s->spool_size += w;
    s->spool_kept[stream] += (int64_t)keep;
}

/* Replay the spool to an attached server, a record at a time as the socket takes it
 * (past what it has of each stream); at its end, live output resumes, or the recorded
 * exit event is sent. */
static void pump_replay(struct sess *s) {
    while (s->replaying && sock_open(s) && !buf_avail(&s->out)) {
        if (s->replay_at >= s->spool_size) {
            s->replaying = false;
            if (s->have_status) /* what the pipes still hold is read from now */
                s->drain_until = now_ns() + DRAIN_NS;
            if (s->job == JOB_DONE && buf_avail(&s->exit_ev))
                send_frame(s, 'J', s->exit_ev.d + s->exit_ev.off, buf_avail(&s->exit_ev));
            return;
        }
        unsigned char h[FRAME_HDR];
        uint32_t len = 0;
        bool ok = pread(s->spool_fd, h, FRAME_HDR, s->replay_at) == FRAME_HDR;
        if (ok) {
            len = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
            ok = len <= READ_CHUNK &&
                 pread(s->spool_fd, g_buf, len, s->replay_at + FRAME_HDR) == (ssize_t)len;
        }
        if (!ok) {
            logmsg("job %s: spool unreadable at %lld", s->job_id, (long long)s->replay_at);
            s->replay_at = s->spool_size;
            continue;
        }
        s->replay_at += FRAME_HDR + len;
        int stream = h[0] == 'E';
        int64_t skip = s->replay_skip[stream] < (int64_t)len ? s->replay_skip[stream] : len;
        s->replay_skip[stream] -= skip;
        if ((int64_t)len > skip)
            send_frame(s, (char)h[0], g_buf + skip, len - (size_t)skip);
    }
}

/* ------------------------------------------------------------------ process trees */

struct proc {
    pid_t pid, ppid;
    bool zombie;
};

static int by_ppid(const void *a, const void *b) {
    pid_t x = ((const struct proc *)a)->ppid, y = ((const struct proc *)b)->ppid;
    return (x > y) - (x < y);
}

/* Send sig to every live descendant of root; returns how many there were. */
static int signal_descendants(pid_t root, int sig) {
    int proc = g_proc >= 0 ? openat(g_proc, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                           : open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = proc >= 0 ? fdopendir(proc) : NULL;
    if (!d) {
        if (proc >= 0)
            close(proc);
        return 0;
    }
    struct proc *ps = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0)
            continue;
        char path[64], stat[256];
        snprintf(path, sizeof path, "%ld/stat", pid);
        int fd = openat(dirfd(d), path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t len = read(fd, stat, sizeof stat - 1);
        close(fd);
        if (len <= 0)
            continue;
        stat[len] = 0;
        /* The command name may hold spaces and parentheses: parse after the last ')'
         * (it is at most 16 bytes, so within what was read). */
        char *rp = strrchr(stat, ')');
        char state;
        int ppid;
        if (!rp || sscanf(rp + 1, " %c %d", &state, &ppid) != 2)
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 256;
            struct proc *np = realloc(ps, cap * sizeof *ps);
            if (!np)
                break;
            ps = np;
        }
        ps[n++] = (struct proc){(pid_t)pid, (pid_t)ppid, state == 'Z' || state == 'X'};
    }
    closedir(d);
    int killed = 0;
    pid_t *todo = n ? malloc((n + 1) * sizeof *todo) : NULL;
    if (todo) {
        qsort(ps, n, sizeof *ps, by_ppid);
        size_t head = 0, tail = 0;
        todo[tail++] = root;
        while (head < tail) {
            pid_t parent = todo[head++];
            size_t lo = 0, hi = n; /* first entry with ppid >= parent */
            while (lo < hi) {
                size_t mid = (lo + hi) / 2;
                if (ps[mid].ppid < parent)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            for (; lo < n && ps[lo].ppid == parent && tail <= n; lo++) {
                todo[tail++] = ps[lo].pid;
                if (!ps[lo].zombie && kill(ps[lo].pid, sig) == 0)
                    killed++;
            }
        }
    }
    free(todo);
    free(ps);
    return killed;
}

static void sweep(struct sess *s) {
    if (!s->sup_alive) {
        s->killing = false;
        return;
    }
    signal_descendants(s->sup, SIGKILL);
    if (++s->sweeps >= MAX_SWEEPS) {
        kill(s->sup, SIGKILL); /* give up on the tree, as agent.py does */
        s->killing = false;
        return;
    }
    /* The supervisor leaves (and is reaped, ending this) once its last child is gone. */
    s->next_sweep = now_ns() + SWEEP_NS;
}

static void start_kill(struct sess *s) {
    if (!s->sup_alive || s->killing)
        return;
    s->killing = true;
    s->sweeps = 0;
    kill(s->sup, SIGUSR1); /* kill mode: stay until the tree is empty */
    sweep(s);
}

/* ------------------------------------------------------------------ job start */

struct spawn {
    char **argv, **envp;
    const char *cwd;
    bool pty, as_root;
    int fds[3]; /* the job's stdin, stdout, stderr */
    int status_w, err_w;
    const int *cg_fds;
    int ncg;
    /* Per-process limits: RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE; RLIM_INFINITY: none. */
    rlim_t cpu, fsize, nofile;
};

/* Lower a limit (soft and hard) to at most value; never raise it. */
static int lower_rlimit(int resource, rlim_t value, rlim_t hard_extra) {
    struct rlimit rl;
    if (value == RLIM_INFINITY)
        return 0;
    if (getrlimit(resource, &rl) < 0)
        return -1;
    rlim_t hard = value + hard_extra;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < hard)
        hard = rl.rlim_max;
    rl.rlim_cur = value < hard ? value : hard;
    rl.rlim_max = hard;
    return setrlimit(resource, &rl);
}

static void close_range_(unsigned lo, unsigned hi) {
    if (lo > hi)
        return;
    if (syscall(SYS_close_range, lo, hi, 0) == 0)
        return;
    struct rlimit rl;
    unsigned max = 65536;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < max)
        max = (unsigned)rl.rlim_cur;
    for (unsigned fd = lo; fd <= hi && fd < max; fd++)
        close((int)fd);
}

/* Close every descriptor from 3 up but those in keep. */
static void close_fds_except(int *keep, int n) {
    for (int i = 1; i < n; i++) /* insertion sort: n is 5 */
        for (int j = i; j > 0 && keep[j - 1] > keep[j]; j--) {
            int t = keep[j];
            keep[j] = keep[j - 1];
            keep[j - 1] = t;
        }
    unsigned lo = 3;
    for (int i = 0; i < n; i++) {
        if (keep[i] < 0 || (unsigned)keep[i] < lo)
            continue;
        if ((unsigned)keep[i] > lo)
            close_range_(lo, (unsigned)keep[i] - 1);
        lo = (unsigned)keep[i] + 1;
    }
    close_range_(lo, ~0U);
}

static const char *env_get(char **envp, const char *name) {
    size_t n = strlen(name);
    for (; *envp; envp++)
        if (!strncmp(*envp, name, n) && (*envp)[n] == '=')
            return *envp + n + 1;
    return NULL;
}

/* os.execvpe: a name with a slash is run as is; else each directory of the job's PATH
 * is tried; the error is the first one other than "no such file" (say EACCES), else
 * the last.  Returns the errno (only returns on failure). */
static int exec_search(char **argv, char **envp) {
    const char *file = argv[0];
    if (!*file)
        return ENOENT;
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return errno;
    }
    const char *path = env_get(envp, "PATH");
    if (!path)
        path = DEFAULT_PATH;
    size_t flen = strlen(file);
    char full[PATH_MAX];
    int saved = 0, last = ENOENT;
    for (const char *p = path;; p++) {
        const char *seg = p;
        while (*p && *p != ':')
            p++;
        size_t dlen = (size_t)(p - seg);
        if (dlen + 1 + flen + 1 > sizeof full) {
            last = ENAMETOOLONG;
        } else {
            memcpy(full, seg, dlen);
            size_t at = dlen;
            if (dlen && seg[dlen - 1] != '/')
                full[at++] = '/';
            memcpy(full + at, file, flen + 1);
            execve(full, argv, envp);
            last = errno;
            if (last != ENOENT && last != ENOTDIR && !saved)
                saved = last;
        }
        if (!*p)
            break;
    }
    return saved ? saved : last;
}

static _Noreturn void run_job(const struct spawn *sp) {
    /* Every disposition back to its default: an exec keeps an ignored signal, and the
     * agent may have been handed SIGINT and SIGQUIT ignored (a server started in the
     * background by a shell) besides the SIGPIPE it ignores itself.  Through the system
     * call: libc's sigaction refuses the real-time signals it keeps for itself (32, 33),
     * which may have come ignored too.  An all-zero kernel sigaction is SIG_DFL, no
     * flags, no mask, whatever the architecture's layout of it. */
    for (int sig = 1; sig <= 64; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        unsigned long dfl[4] = {0};
        syscall(SYS_rt_sigaction, sig, dfl, NULL, (size_t)8);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int err;
    if (sp->pty && (setsid() < 0 || ioctl(sp->fds[0], TIOCSCTTY, 0) < 0))
        goto fail;
    for (int t = 0; t < 3; t++)
        if (dup2(sp->fds[t], t) < 0) /* the copies lose O_CLOEXEC; the originals close */
            goto fail;
    /* CPU: SIGXCPU at the limit, SIGKILL a second later if it is handled. */
    if (lower_rlimit(RLIMIT_CPU, sp->cpu, 1) < 0 || lower_rlimit(RLIMIT_FSIZE, sp->fsize, 0) < 0 ||
        lower_rlimit(RLIMIT_NOFILE, sp->nofile, 0) < 0)
        goto fail;
    uid_t uid = sp->as_root ? 0 : g_uid;
    gid_t gid = sp->as_root ? 0 : g_gid;
    if (setgroups(0, NULL) < 0 || setgid(gid) < 0 || setuid(uid) < 0)
        goto fail;
    if (chdir(sp->cwd) < 0) {
        err = -(errno ? errno : EIO); /* negative: the working directory, not the command */
        goto report;
    }
    errno = exec_search(sp->argv, sp->envp);
fail:
    err = errno ? errno : EIO;
report:
    if (write(sp->err_w, &err, sizeof err) < 0) {
        /* the agent is gone */
    }
    _exit(127);
}

#ifndef SPAWN_WITH_FORK
static int job_main(void *sp) { run_job(sp); }
#endif

static void on_usr1(int sig) {
    (void)sig;
    g_killmode = 1;
}

/* The supervisor: child subreaper of the job's tree; reports how the main process
 * ended on the status pipe.  Runs in a fork of the (single-threaded) agent. */
static _Noreturn void supervise(const struct spawn *sp) {
    /* Into the job's cgroups first: everything it starts is born there. */
    for (int i = 0; i < sp->ncg; i++) {
        if (write(sp->cg_fds[i], "0", 1) != 1) {
            int err = ERR_LIMITS + (errno ? errno : EIO);
            if (write(sp->err_w, &err, sizeof err) < 0) {
                /* the agent is gone */
            }
            _exit(0);
        }
    }
    int keep[5] = {sp->status_w, sp->err_w, sp->fds[0], sp->fds[1], sp->fds[2]};
    close_fds_except(keep, 5); /* other jobs' pipes and sockets, the listener, epoll */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    if (!sp->pty)
        setsid();
    /* SIGUSR1 (kill mode) arrives blocked, as the agent blocks it: whatever was sent
     * early is delivered to the handler when the mask is cleared below. */
    struct sigaction sa = {.sa_handler = on_usr1};
    sigaction(SIGUSR1, &sa, NULL);
    /* vfork-like: the job borrows this process's memory (on a stack of its own) until
     * it execs, which spares copying page tables; this process waits until then. */
#ifdef SPAWN_WITH_FORK
    pid_t job = fork();
    if (job == 0)
        run_job(sp);
#else
    static max_align_t stack[65536 / sizeof(max_align_t)];
    pid_t job = clone(job_main, (char *)stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD,
                      (void *)sp);
#endif
    if (job < 0) {
        int err = errno;
        if (write(sp->err_w, &err, sizeof err) < 0) {
            /* the agent is gone */
        }
        _exit(0);
    }
    close(sp->err_w);
    for (int i = 0; i < 3; i++)
        if (i == 0 || sp->fds[i] != sp->fds[i - 1])
            close(sp->fds[i]);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, 0);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            _exit(0); /* no child left */
        }
        if (pid == job) {
            struct job_status js = {.code = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st)};
            struct rusage ru;
            if (getrusage(RUSAGE_CHILDREN, &ru) == 0) {
                js.utime_us = (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
                js.stime_us = (int64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
                js.maxrss_kb = ru.ru_maxrss;
            }
            if (write(sp->status_w, &js, sizeof js) < 0) {
                /* the agent no longer listens (SIGPIPE stays ignored here) */
            }
            close(sp->status_w);
            job = 0;
            /* Normally the job ends with its main process (what it left in the
             * background is orphaned); killed, the tree goes down whole first. */
            if (!g_killmode)
                _exit(0);
        }
    }
}


static void close_cgroup_fds(struct sess *s) {
    for (int i = 0; i < s->ncg; i++)
        close(s->cg_fds[i]);
    s->ncg = 0;
}

static void set_winsize(int fd, int rows, int cols) {
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
    ioctl(fd, TIOCSWINSZ, &ws);
}

/* rows/cols: Python's int(value or default), kept to what a winsize holds. */
static int dimension(const struct jv *v, int dflt, bool *bad) {
    if (!jtruthy(v))
        return dflt;
    if (v->t == JTRUE)
        return 1;
    if (v->t != JNUM) {
        *bad = true;
        return dflt;
    }
    double d = v->num;
    return d < 0 ? 0 : d > 65535 ? 65535 : (int)d;
}

static void do_exec(struct sess *s, const struct jv *req, struct arena *a) {
    const struct jv *argv_v = jget(req, "argv"), *env_v = jget(req, "env");
    const struct jv *cwd_v = jget(req, "cwd"), *timeout_v = jget(req, "timeout");
    if (!argv_v || argv_v->t != JARR || !argv_v->n) {
        start_failed(s, "argv must be a non-empty list of strings");
        return;
    }
    char **argv = arena_alloc(a, (argv_v->n + 1) * sizeof *argv);
    size_t envn = env_v && env_v->t == JOBJ ? env_v->n : 0;
    char **envp = arena_alloc(a, (envn + 1) * sizeof *envp);
    if (!argv || !envp) {
        start_failed(s, "out of memory");
        return;
    }
    size_t i = 0;
    for (struct jv *k = argv_v->kids; k; k = k->next) {
        if (!jcstr(k)) {
            start_failed(s, "argv must be a non-empty list of strings");
            return;
        }
        argv[i++] = k->s;
    }
    argv[i] = NULL;
    if (env_v && env_v->t != JNULL && env_v->t != JOBJ) {
        start_failed(s, "env must be an object of strings");
        return;
    }
    i = 0;
    for (struct jv *k = envn ? env_v->kids : NULL; k; k = k->next) {
        if (!jcstr(k) || !k->keyn || strlen(k->key) != k->keyn || memchr(k->key, '=', k->keyn)) {
            start_failed(s, "env must be an object of strings (names without '=')");
            return;
        }
        bool later = false; /* a name given twice: the last value counts */
        for (struct jv *l = k->next; l && !later; l = l->next)
            later = l->keyn == k->keyn && !memcmp(l->key, k->key, k->keyn);
        if (later)
            continue;
        char *kv = arena_alloc(a, k->keyn + k->n + 2);
        if (!kv) {
            start_failed(s, "out of memory");
            return;
        }
        memcpy(kv, k->key, k->keyn);
        kv[k->keyn] = '=';
        memcpy(kv + k->keyn + 1, k->s, k->n + 1);
        envp[i++] = kv;
    }
    envp[i] = NULL;
    const char *cwd = g_home;
    if (jtruthy(cwd_v)) {
        if (!jcstr(cwd_v)) {
            start_failed(s, "cwd must be a string or null");
            return;
        }
        cwd = cwd_v->s;
    }
    s->has_timeout = false;
    if (jtruthy(timeout_v)) {
        if (timeout_v->t != JNUM && timeout_v->t != JTRUE) {
            start_failed(s, "timeout must be a number or null");
            return;
        }
        double t = timeout_v->t == JTRUE ? 1 : timeout_v->num;
        s->has_timeout = true;
        s->timeout_ns = t <= 0 ? 0 : t > 1e9 ? (int64_t)1e18 : (int64_t)(t * 1e9);
    }
    bool pty = jtruthy(jget(req, "pty")), bad = false;
    int rows = pty ? dimension(jget(req, "rows"), 24, &bad) : 24;
    int cols = pty ? dimension(jget(req, "cols"), 80, &bad) : 80;
    if (bad) {
        start_failed(s, "rows and cols must be numbers");
        return;
    }
    const struct jv *user_v = jget(req, "user");
    if (jtruthy(user_v) && !jis_str(user_v, "root") && !jis_str(user_v, "user")) {
        start_failed(s, "user must be \"root\", \"user\" or null");
        return;
    }
    bool as_root = jis_str(user_v, "root");
    bool piped_stdin = !pty && jtruthy(jget(req, "stdin"));
    struct spawn sp = {.argv = argv, .envp = envp, .cwd = cwd, .pty = pty, .as_root = as_root,
                       .cg_fds = s->cg_fds, .ncg = s->ncg, .cpu = RLIM_INFINITY,
                       .fsize = RLIM_INFINITY, .nofile = RLIM_INFINITY};
    const struct jv *lim_v = jget(req, "rlimits");
    if (jtruthy(lim_v)) {
        static const char *const names[] = {"cpu_seconds", "file_size_bytes", "open_files"};
        rlim_t *slots[] = {&sp.cpu, &sp.fsize, &sp.nofile};
        if (lim_v->t != JOBJ) {
            start_failed(s, "rlimits must be an object of numbers");
            return;
        }
        for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
            const struct jv *v = jget(lim_v, names[k]);
            if (!v || v->t == JNULL)
                continue;
            if (v->t != JNUM || v->num < 1 || v->num > 1e15) {
                start_failed(s, "rlimits.%s must be a number from 1", names[k]);
                return;
            }
            *slots[k] = (rlim_t)v->num;
        }
    }
    const struct jv *oom_v = jget(req, "oom_kills_before");
    if (oom_v && oom_v->t != JNULL) {
        if (oom_v->t != JNUM || oom_v->num < 0 || oom_v->num > 1e15) {
            start_failed(s, "oom_kills_before must be a number from 0");
            return;
        }
        s->oom_before = (int64_t)oom_v->num;
    }
    if (jtruthy(jget(req, "persist"))) {
        const struct jv *id_v = jget(req, "job_id"), *cap_v = jget(req, "spool_bytes");
        bool id_ok = jcstr(id_v) && id_v->n && id_v->n <= MAX_JOB_ID;
        for (size_t k = 0; id_ok && k < id_v->n; k++) {
            char c = id_v->s[k];
            id_ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_';
        }
        if (pty) {
            start_failed(s, "persist is for jobs without a terminal");
            return;
        }
        if (!id_ok) {
            start_failed(s, "job_id must be 1 to %d letters, digits, '-' or '_'", MAX_JOB_ID);
            return;
        }
        if (find_job(id_v->s)) {
            start_failed(s, "job %s exists already", id_v->s);
            return;
        }
        if (cap_v && cap_v->t != JNULL && (cap_v->t != JNUM || cap_v->num < 0 || cap_v->num > 1e15)) {
            start_failed(s, "spool_bytes must be a number from 0");
            return;
        }
        s->persist = true;
        memcpy(s->job_id, id_v->s, id_v->n + 1);
        s->spool_cap = cap_v && cap_v->t == JNUM ? (int64_t)cap_v->num : DEFAULT_SPOOL_BYTES;
    }

    int status_p[2] = {-1, -1}, err_p[2] = {-1, -1}, out_p[2] = {-1, -1}, eout_p[2] = {-1, -1};
    int in_p[2] = {-1, -1};
    int master = -1, slave = -1;
    const char *what = "pipe";
    /* Both ends non-blocking: the supervisor and the job write one word to an empty pipe. */
    if (pipe2(status_p, O_CLOEXEC | O_NONBLOCK) < 0 || pipe2(err_p, O_CLOEXEC | O_NONBLOCK) < 0)
        goto fail;
    if (pty) {
        what = "openpty";
        master = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || unlockpt(master) < 0)
            goto fail;
        slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (slave < 0) {
            char name[64];
            if (ptsname_r(master, name, sizeof name) != 0)
                goto fail;
            slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
            if (slave < 0)
                goto fail;
        }
        what = "fchown";
        if (fchown(slave, as_root ? 0 : g_uid, (gid_t)-1) < 0)
            goto fail;
        set_winsize(master, rows, cols);
        sp.fds[0] = sp.fds[1] = sp.fds[2] = slave;
    } else {
        if (pipe2(out_p, O_CLOEXEC) < 0 || pipe2(eout_p, O_CLOEXEC) < 0)
            goto fail;
        if (piped_stdin && pipe2(in_p, O_CLOEXEC) < 0)
            goto fail;
        sp.fds[0] = piped_stdin ? in_p[0] : g_devnull;
        sp.fds[1] = out_p[1];
        sp.fds[2] = eout_p[1];
    }
    sp.status_w = status_p[1];
    sp.err_w = err_p[1];
    what = "fork";
    pid_t pid = fork();
    if (pid == 0)
        supervise(&sp);
    if (pid < 0)
        goto fail;
    int child_side[] = {status_p[1], err_p[1], out_p[1], eout_p[1], in_p[0], slave};
    for (size_t k = 0; k < sizeof child_side / sizeof *child_side; k++)
        if (child_side[k] >= 0)
            close(child_side[k]);
    close_cgroup_fds(s);
    /* Only the agent's ends: the job's stdio stays blocking. */
    int mine[] = {out_p[0], eout_p[0], in_p[1], master};
    for (size_t k = 0; k < sizeof mine / sizeof *mine; k++)
        if (mine[k] >= 0)
            fcntl(mine[k], F_SETFL, O_NONBLOCK); /* (F_SETFL ignores the access mode) */
    s->w[W_OUT].fd = pty ? master : out_p[0];
    s->w[W_ERR].fd = pty ? -1 : eout_p[0];
    s->w[W_STATUS].fd = status_p[0];
    s->w[W_EXECERR].fd = err_p[0];
    s->w[W_IN].fd = in_p[1];
    s->started_ns = now_ns();
    s->pty = pty;
    s->sup = pid;
    s->sup_alive = true;
    s->job = JOB_STARTING;
    s->argv0 = strdup(argv[0]);
    return;
fail:;
    int err = errno;
    int all[] = {status_p[0], status_p[1], err_p[0], err_p[1], out_p[0], out_p[1],
                 eout_p[0], eout_p[1], in_p[0], in_p[1], master, slave};
    for (size_t k = 0; k < sizeof all / sizeof *all; k++)
        if (all[k] >= 0)
            close(all[k]);
    start_failed(s, "%s: %s", what, strerror(err));
}

/* ------------------------------------------------------------------ requests */

static void unknown_op(struct sess *s, const struct jv *op) {
    struct buf b = {0};
    buf_puts(&b, "{\"event\":\"error\",\"message\":");
    /* As agent.py words it: f"unknown op {op!r}". */
    struct buf m = {0};
    buf_puts(&m, "unknown op ");
    if (!op || op->t == JNULL) {
        buf_puts(&m, "None");
    } else if (op->t == JSTR) {
        buf_puts(&m, "'");
        buf_put(&m, op->s, op->n);
        buf_puts(&m, "'");
    } else if (op->t == JNUM) {
        buf_printf(&m, "%.17g", op->num);
    } else {
        buf_puts(&m, op->t == JTRUE ? "True" : op->t == JFALSE ? "False"
                     : op->t == JARR ? "[...]" : "{...}");
    }
    jw_str(&b, m.d, m.len);
    buf_free(&m);
    buf_puts(&b, "}");
    send_json(s, &b);
    finish_conn(s);
}

/* attach: this connection takes over a persistent job (its old one, if any, is
 * dropped), the spool is replayed past the offsets, then the job goes on live. */
static void do_attach(struct sess *s, const struct jv *req) {
    const struct jv *id_v = jget(req, "job_id");
    struct sess *t = jcstr(id_v) ? find_job(id_v->s) : NULL;
    if (!t) {
        send_exit(s, false, 0, 0, false, "unknown_job", "no such job in this sandbox");
        finish_conn(s);
        return;
    }
    static const char *const names[] = {"stdout_offset", "stderr_offset"};
    int64_t skip[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        const struct jv *v = jget(req, names[k]);
        if (v && v->t != JNULL && (v->t != JNUM || v->num < 0 || v->num > 1e15)) {
            send_exit(s, false, 0, 0, false, "start_failed", "offsets must be numbers from 0");
            finish_conn(s);
            return;
        }
        skip[k] = v && v->t == JNUM ? (int64_t)v->num : 0;
    }
    if (sock_open(t))
        close_sock(t); /* a connection its server no longer holds */
    wset(&s->w[W_SOCK], 0);
    t->w[W_SOCK].fd = s->w[W_SOCK].fd;
    t->w[W_SOCK].ev = 0;
    s->w[W_SOCK].fd = -1;
    t->in = s->in; /* frames sent after the attach (this request is taken already) */
    t->keep_open = false; /* the attaching connection is closed after the job */
    s->in = (struct buf){0};
    t->replaying = true;
    t->replay_at = 0;
    t->replay_skip[0] = skip[0];
    t->replay_skip[1] = skip[1];
    pump_replay(t);
    process_input(t);
    after(t);
}

/* Control frames a kept connection may still carry for the job it served before (sent
 * by the server before it read that job's exit event): dropped, as that job would. */
static bool leftover(const struct jv *req) {
    static const char *const ops[] = {"kill", "close_stdin", "resize", "forget"};
    for (size_t k = 0; k < sizeof ops / sizeof *ops; k++)
        if (jis_str(jget(req, "op"), ops[k]))
            return true;
    return false;
}

static void handle_request(struct sess *s, char kind, const char *p, size_t n) {
    if (kind == 'I' && s->handed)
        return; /* input for the job this connection served before */
    if (kind != 'J') {
        unknown_op(s, NULL);
        return;
    }
    struct arena a = {0};
    const char *err;
    struct jv *req = jparse(&a, p, n, &err);
    if (req && req->t == JOBJ && s->handed && leftover(req)) {
        arena_free(&a);
        return;
    }
    if (!req)
        start_failed(s, "bad request: %s", err);
    else if (req->t != JOBJ)
        start_failed(s, "bad request: not a JSON object");
    else if (jis_str(jget(req, "op"), "ping")) {
        send_event_pid(s, "pong", getpid());
        finish_conn(s);
    } else if (jis_str(jget(req, "op"), "exec")) {
        s->keep_open = jtruthy(jget(req, "keep_open"));
        do_exec(s, req, &a);
    }
    else if (jis_str(jget(req, "op"), "attach"))
        do_attach(s, req);
    else
        unknown_op(s, jget(req, "op"));
    arena_free(&a);
}

/* Where input goes: the terminal, or the piped stdin; -1 once nobody reads it. */
static int input_fd(const struct sess *s) {
    if (s->pty)
        return s->w[W_OUT].eof ? -1 : s->w[W_OUT].fd;
    return s->w[W_IN].fd;
}

static void write_input(struct sess *s) {
    int fd = input_fd(s);
    while (buf_avail(&s->pend)) {
        ssize_t w = fd < 0 ? -1 : write(fd, s->pend.d + s->pend.off, buf_avail(&s->pend));
        if (w > 0) {
            s->pend.off += (size_t)w;
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else if (w < 0 && errno == EAGAIN) {
            return; /* wait for EPOLLOUT on the master */
        } else {
            /* EIO: nobody holds the terminal any more; EPIPE: nobody reads the pipe:
             * the input is dropped (and a pipe nobody reads is closed). */
            if (!s->pty)
                wclose(&s->w[W_IN]);
            break;
        }
    }
    buf_free(&s->pend);
}

/* A bad frame during a job: the connection is no longer trusted; the job is killed. */
static void protocol_error(struct sess *s, const char *what) {
    if (s->job == JOB_NONE) {
        start_failed(s, "bad request: %s", what);
        return;
    }
    s->no_input = true;
    s->killed = true;
    if (!s->message) {
        size_t n = strlen(what) + 16;
        s->message = malloc(n);
        if (s->message)
            snprintf(s->message, n, "bad request: %s", what);
    }
    start_kill(s);
}

static void handle_control(struct sess *s, char kind, const char *p, size_t n) {
    if (kind == 'I') {
        if (input_fd(s) >= 0 && n) {
            if (!buf_put(&s->pend, p, n)) {
                buf_free(&s->pend);
                protocol_error(s, "out of memory");
                return;
            }
            write_input(s);
        }
        return;
    }
    if (kind != 'J')
        return;
    struct arena a = {0};
    const char *err;
    struct jv *msg = jparse(&a, p, n, &err);
    if (!msg || msg->t != JOBJ) {
        protocol_error(s, msg ? "not a JSON object" : err);
    } else if (jis_str(jget(msg, "op"), "forget")) {
        if (s->persist && s->job == JOB_DONE) { /* its server has recorded the end */
            s->forgotten = true;
            finish_conn(s);
        }
    } else if (s->job == JOB_DONE) {
        /* the job is over: nothing else applies */
    } else if (jis_str(jget(msg, "op"), "kill")) {
        const struct jv *sg = jget(msg, "signal");
        int sig = sg && sg->t == JNUM && sg->num >= 1 && sg->num < NSIG ? (int)sg->num : SIGKILL;
        s->killed = true;
        s->kill_signal = sig;
        if (sig == SIGKILL)
            start_kill(s);
        else if (s->sup_alive)
            signal_descendants(s->sup, sig);
    } else if (jis_str(jget(msg, "op"), "close_stdin")) {
        /* Input before it is written already (frames wait while input is pending). */
        if (s->pty && input_fd(s) >= 0) {
            buf_put(&s->pend, "\x04", 1); /* ^D: end of input at a line's start */
            write_input(s);
        } else {
            wclose(&s->w[W_IN]);
        }
    } else if (jis_str(jget(msg, "op"), "resize") && s->pty && s->w[W_OUT].fd >= 0 &&
               !s->w[W_OUT].eof) {
        /* The foreground process group learns of it by SIGWINCH. */
        const struct jv *r = jget(msg, "rows"), *c = jget(msg, "cols");
        if (r && c && r->t == JNUM && c->t == JNUM) {
            bool bad = false;
            set_winsize(s->w[W_OUT].fd, dimension(r, 0, &bad), dimension(c, 0, &bad));
        }
    }
    arena_free(&a);
}

/* Take the complete frames read so far. */
static void process_input(struct sess *s) {
    while (takes_frames(s)) {
        size_t avail = buf_avail(&s->in);
        if (avail < FRAME_HDR)
            break;
        const unsigned char *h = (const unsigned char *)s->in.d + s->in.off;
        uint32_t len = (uint32_t)h[1] << 24 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 8 | h[4];
        if (len > MAX_FRAME) {
            protocol_error(s, "frame too large");
            break;
        }
        if (avail < FRAME_HDR + (size_t)len)
            break;
        s->in.off += FRAME_HDR + (size_t)len;
        if (s->job == JOB_NONE)
            handle_request(s, (char)h[0], (const char *)h + FRAME_HDR, len);
        else
            handle_control(s, (char)h[0], (const char *)h + FRAME_HDR, len);
    }
    if (sock_open(s) && !buf_avail(&s->in))
        buf_free(&s->in);
}

/* ------------------------------------------------------------------ events */

/* Read from the socket; descriptors that come along are kept (up to MAX_CG_FDS) only
 * before the job starts: they are the job's cgroups. */
static ssize_t recv_with_fds(struct sess *s) {
    union {
        struct cmsghdr h;
        char space[CMSG_SPACE(sizeof(int) * MAX_CG_FDS)];
    } ctl;
    struct iovec iov = {g_buf, SOCK_READ};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.space,
                       .msg_controllen = sizeof ctl.space};
    ssize_t n = recvmsg(s->w[W_SOCK].fd, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0)
        return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *fds = (int *)CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            if (s->job == JOB_NONE && s->ncg < MAX_CG_FDS)
                s->cg_fds[s->ncg++] = fds[i];
            else
                close(fds[i]);
        }
    }
    if (m.msg_flags & MSG_CTRUNC)
        logmsg("descriptors beyond %d dropped", MAX_CG_FDS);
    return n;
}

static void on_sock(struct sess *s, uint32_t ev) {
    if (ev & EPOLLOUT) {
        while (buf_avail(&s->out)) {
            ssize_t w = send(s->w[W_SOCK].fd, s->out.d + s->out.off, buf_avail(&s->out),
                             MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w > 0)
                s->out.off += (size_t)w;
            else if (w < 0 && errno == EINTR)
                continue;
            else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            else {
                disconnect(s);
                return;
            }
        }
        if (!buf_avail(&s->out)) {
            buf_free(&s->out);
            if (s->closing) {
                end_conn(s);
                return;
            }
        }
    }
    if (ev & EPOLLIN) {
        ssize_t n = recv_with_fds(s);
        if (n > 0) {
            if (!buf_put(&s->in, g_buf, (size_t)n)) {
                logmsg("out of memory");
                disconnect(s);
                return;
            }
            process_input(s);
        } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            disconnect(s);
        }
    } else if (ev & (EPOLLHUP | EPOLLERR | EPOLLRDHUP)) {
        disconnect(s);
    }
}

static void on_output(struct sess *s, struct watch *w, uint32_t ev) {
    if (w->kind == W_OUT && s->pty && buf_avail(&s->pend) &&
        (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
        write_input(s);
        if (!buf_avail(&s->pend))
            process_input(s); /* frames held back behind that input */
    }
    if (!(w->ev & EPOLLIN) || !(ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
        return; /* paused: backpressure from the socket */
    ssize_t n = read(w->fd, g_buf, READ_CHUNK);
    if (n > 0) {
        if (s->persist)
            spool(s, w->kind == W_OUT ? 0 : 1, g_buf, (size_t)n);
        send_frame(s, w->kind == W_OUT ? 'O' : 'E', g_buf, (size_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        /* End of file, or EIO from a pty whose last holder closed it.  Not closed yet:
         * closing a pty master hangs its terminal up, and the job that just closed its
         * stdio may not have exited yet (SIGHUP would kill it). */
        w->eof = true;
        wset(w, 0);
        if (buf_avail(&s->pend)) { /* input for a terminal nobody holds any more */
            buf_free(&s->pend);
            process_input(s);
        }
    }
}

/* The piped stdin can take more (or its reader is gone). */
static void on_stdin(struct sess *s, uint32_t ev) {
    if (buf_avail(&s->pend) && (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))) {
        write_input(s);
        if (!buf_avail(&s->pend))
            process_input(s); /* frames held back behind that input */
    }
}

static void on_status(struct sess *s) {
    struct job_status js;
    ssize_t n = read(s->w[W_STATUS].fd, &js, sizeof js);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    s->have_status = true;
    s->ended_ns = now_ns();
    s->have_usage = n == (ssize_t)sizeof js;
    if (s->have_usage)
        s->usage = js;
    s->status = s->have_usage ? js.code : -SIGKILL; /* nothing: the supervisor was killed */
    wclose(&s->w[W_STATUS]);
    s->drain_until = now_ns() + DRAIN_NS;
}

/* The error pipe closes on a successful exec; bytes on it are the errno of a failure. */
static void on_execerr(struct sess *s) {
    int err = 0;
    ssize_t n = read(s->w[W_EXECERR].fd, &err, sizeof err);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    wclose(&s->w[W_EXECERR]);
    if (n > 0 && n < (ssize_t)sizeof err)
        err = EIO;
    if (n != 0 && err) {
        wclose(&s->w[W_OUT]);
        wclose(&s->w[W_ERR]);
        wclose(&s->w[W_STATUS]);
        s->job = JOB_DONE;
        char msg[512];
        if (err >= ERR_LIMITS) {
            snprintf(msg, sizeof msg, "cannot place the job in its cgroup: %s",
                     strerror(err - ERR_LIMITS));
            send_exit(s, false, 0, 0, false, "start_failed", msg);
            finish_conn(s);
            return;
        }
        if (err < 0) {
            snprintf(msg, sizeof msg, "working directory: %s", strerror(-err));
            send_exit(s, true, 126, 0, false, "invalid_cwd", msg);
            finish_conn(s);
            return;
        }
        snprintf(msg, sizeof msg, "%s: %s", s->argv0 ? s->argv0 : "", strerror(err));
        bool missing = err == ENOENT;
        send_exit(s, true, missing ? 127 : 126, 0, false, missing ? "not_found" : "exec_failed",
                  msg);
        finish_conn(s);
        return;
    }
    s->job = JOB_RUNNING;
    s->has_deadline = s->has_timeout;
    if (s->has_timeout)
        s->deadline = now_ns() + s->timeout_ns;
    if (!sock_open(s) && !s->persist) {
        start_kill(s); /* the server left while it started */
        return;
    }
    /* Owed, not sent: it goes with the job's first frame or after STARTED_DELAY_NS. */
    s->started_pending = true;
    s->started_due = now_ns() + STARTED_DELAY_NS;
    process_input(s); /* what came along with the request */
}

/* The job's main process has exited and its output is drained (or the drain is
 * over): send the exit event and close. */
static bool outputs_open(const struct sess *s) {
    return (s->w[W_OUT].fd >= 0 && !s->w[W_OUT].eof) || (s->w[W_ERR].fd >= 0 && !s->w[W_ERR].eof);
}

static void check_complete(struct sess *s) {
    if (s->dead || s->job != JOB_RUNNING || !s->have_status || s->killing || s->replaying)
        return;
    if (outputs_open(s) && now_ns() < s->drain_until)
        return;
    wclose(&s->w[W_OUT]);
    wclose(&s->w[W_ERR]);
    wclose(&s->w[W_IN]);
    buf_free(&s->pend);
    s->job = JOB_DONE;
    int sig = s->status < 0 ? -s->status : 0;
    send_exit(s, true, sig ? 128 + sig : s->status, sig, s->timed_out,
              s->timed_out ? "timeout" : s->killed ? "killed" : NULL, s->message);
    finish_conn(s);
}

static void maybe_free(struct sess *s) {
    if (s->dead || sock_open(s) || s->job == JOB_STARTING || s->job == JOB_RUNNING)
        return;
    if (s->persist && !s->forgotten)
        return; /* ended, but its server has not recorded that yet */
    if (s->spool_fd >= 0)
        close(s->spool_fd);
    s->spool_fd = -1;
    buf_free(&s->exit_ev);
    for (int k = 0; k < W_N; k++)
        wclose(&s->w[k]);
    close_cgroup_fds(s);
    buf_free(&s->in);
    buf_free(&s->out);
    buf_free(&s->pend);
    s->dead = true; /* unlinked and freed after this round of events */
}

static void after(struct sess *s) {
    if (s->replaying)
        pump_replay(s);
    check_complete(s);
    update(s);
    maybe_free(s);
}

static void on_accept(void) {
    for (;;) {
        int fd = accept4(g_listen, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {
                /* Out of descriptors: take the connection and drop it rather than
                 * spin on a listener that stays readable; without a spare descriptor
                 * for that, stop listening until a connection ends. */
                if (g_reserve >= 0) {
                    close(g_reserve);
                    fd = accept4(g_listen, NULL, NULL, SOCK_CLOEXEC);
                    if (fd >= 0)
                        close(fd);
                    g_reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
                }
                if (g_reserve < 0)
                    wset(&g_wlisten, 0);
                logmsg("out of file descriptors: connection refused");
            }
            return;
        }
        struct sess *s = new_sess(fd);
        if (!s) {
            close(fd);
            continue;
        }
        update(s);
        on_sock(s, EPOLLIN); /* the request is often there already */
        after(s);
    }
}

static void on_sigchld(void) {
    struct signalfd_siginfo si;
    while (read(g_sigfd, &si, sizeof si) > 0) {
    }
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0)
            return;
        for (struct sess *s = g_sessions; s; s = s->next) {
            if (s->sup == pid && s->sup_alive) {
                s->sup_alive = false;
                s->killing = false; /* in kill mode it leaves only with the tree gone */
                if (!s->dead)
                    after(s);
                break;
            }
        }
    }
}

/* Timers (timeouts, drains, sweeps); returns the next one due, or -1. */
static int64_t run_timers(void) {
    int64_t now = now_ns(), next = -1;
    for (struct sess *s = g_sessions; s; s = s->next) {
        if (s->dead)
            continue;
        if (s->killing && now >= s->next_sweep)
            sweep(s);
        if (s->started_pending && now >= s->started_due)
            send_started(s);
        if (s->job == JOB_RUNNING && s->has_deadline && !s->have_status && now >= s->deadline) {
            s->has_deadline = false;
            s->timed_out = true;
            start_kill(s);
        }
        after(s);
        if (s->dead)
            continue;
        int64_t due = -1;
        if (s->killing)
            due = s->next_sweep;
        if (s->started_pending && (due < 0 || s->started_due < due))
            due = s->started_due;
        if (s->job == JOB_RUNNING && s->has_deadline && !s->have_status &&
            (due < 0 || s->deadline < due))
            due = s->deadline;
        /* (While a kill runs, completion waits for it, not for the drain's end.) */
        if (s->job == JOB_RUNNING && s->have_status && !s->killing && outputs_open(s) &&
            (due < 0 || s->drain_until < due))
            due = s->drain_until;
        if (due >= 0 && (next < 0 || due < next))
            next = due;
    }
    return next;
}

static void free_dead(void) {
    struct sess *s = g_sessions;
    bool freed = false;
    while (s) {
        struct sess *next = s->next;
        if (s->dead) {
            if (s->prev)
                s->prev->next = s->next;
            else
                g_sessions = s->next;
            if (s->next)
                s->next->prev = s->prev;
            free(s->argv0);
            free(s->message);
            free(s);
            freed = true;
        }
        s = next;
    }
    if (freed && !g_wlisten.ev) { /* descriptors came free: listen again */
        if (g_reserve < 0)
            g_reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
        wset(&g_wlisten, EPOLLIN);
    }
}

/* ------------------------------------------------------------------ main */

/* Spools are unlinked as they are made: a name left is one an agent died with. */
static void clear_spools(void) {
    DIR *d = opendir(g_spool_dir);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            unlinkat(dirfd(d), e->d_name, 0);
    closedir(d);
}

static _Noreturn void serve(const char *dir, pid_t reaper) {
    g_proc = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    clear_spools();
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (getppid() != reaper)
        _exit(1);
    signal(SIGPIPE, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGUSR1); /* inherited blocked by supervisors until they are ready */
    sigprocmask(SIG_BLOCK, &set, NULL);
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    g_sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    g_devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    g_reserve = open("/dev/null", O_RDONLY | O_CLOEXEC);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    if (g_sigfd < 0 || g_devnull < 0 || g_ep < 0) {
        logmsg("setup failed: %s", strerror(errno));
        _exit(1);
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if ((size_t)snprintf(addr.sun_path, sizeof addr.sun_path, "%s/%s", dir, SOCKET_NAME) >=
        sizeof addr.sun_path) {
        logmsg("socket path %s/%s is too long", dir, SOCKET_NAME);
        _exit(1);
    }
    unlink(addr.sun_path);
    g_listen = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    mode_t old = umask(0177); /* born 0600: never reachable by anyone else */
    int rc = g_listen < 0 ? -1 : bind(g_listen, (struct sockaddr *)&addr, sizeof addr);
    umask(old);
    if (rc < 0 || chmod(addr.sun_path, 0600) < 0 || listen(g_listen, 128) < 0) {
        logmsg("cannot listen on %s: %s", addr.sun_path, strerror(errno));
        _exit(1);
    }
    g_wlisten.fd = g_listen;
    g_wsig.fd = g_sigfd;
    wset(&g_wlisten, EPOLLIN);
    wset(&g_wsig, EPOLLIN);
    int64_t next = -1;
    for (;;) {
        int timeout = -1;
        if (next >= 0) {
            int64_t wait = next - now_ns();
            timeout = wait <= 0 ? 0 : wait > INT_MAX * 1000000LL ? INT_MAX
                                                                 : (int)((wait + 999999) / 1000000);
        }
        struct epoll_event evs[64];
        int n = epoll_wait(g_ep, evs, 64, timeout);
        if (n < 0 && errno != EINTR) {
            logmsg("epoll_wait: %s", strerror(errno));
            _exit(1);
        }
        for (int i = 0; i < n; i++) {
            struct watch *w = evs[i].data.ptr;
            if (w == &g_wlisten) {
                on_accept();
                continue;
            }
            if (w == &g_wsig) {
                on_sigchld();
                continue;
            }
            struct sess *s = w->s;
            if (s->dead || w->fd < 0)
                continue; /* closed earlier in this round */
            uint32_t ev = evs[i].events;
            switch (w->kind) {
            case W_SOCK: on_sock(s, ev); break;
            case W_OUT: case W_ERR: on_output(s, w, ev); break;
            case W_IN: on_stdin(s, ev); break;
            case W_STATUS: on_status(s); break;
            case W_EXECERR: on_execerr(s); break;
            }
            after(s);
        }
        next = run_timers();
        free_dead();
    }
}

static long env_long(const char *name, long dflt) {
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    char *end;
    long n = strtol(v, &end, 10);
    return *end ? dflt : n;
}

int main(void) {
    /* Not dumpable: a root job (root of the same namespace, with the same capabilities)
     * could otherwise open /proc/<agent>/mem and take the agent over, or reach its
     * descriptors (the host's log file, the jobs' spools, the cgroup descriptors the
     * server sends) through /proc/<agent>/fd.  Without CAP_SYS_PTRACE, which no
     * sandbox holds, nobody inside passes ptrace's access check for a process that is
     * not dumpable.  Inherited by the agent's forks; a job's exec makes it dumpable. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return 1;
    for (int fd = 0; fd < 3; fd++) /* pipes and sockets must never land on 0-2 */
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
            return 1;
    g_uid = (uid_t)env_long("BASTION_UID", 1000);
    g_gid = (gid_t)env_long("BASTION_GID", 1000);
    g_home = getenv("BASTION_HOME");
    if (!g_home || !*g_home)
        g_home = "/";
    g_spool_dir = getenv("BASTION_SPOOL_DIR");
    if (!g_spool_dir || !*g_spool_dir)
        g_spool_dir = DEFAULT_SPOOL_DIR;
    const char *dir = getenv("BASTION_SOCKET_DIR");
    if (!dir || !*dir)
        dir = DEFAULT_SOCKET_DIR;
    /* Outside a container (tests) the reaper is no PID 1: adopt orphans all the same. */
    if (getpid() != 1)
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    pid_t reaper = getpid();
    pid_t server = fork();
    if (server < 0) {
        logmsg("fork: %s", strerror(errno));
        return 1;
    }
    if (server == 0)
        serve(dir, reaper);
    /* PID 1: reap every orphan; end the sandbox when the agent server dies. */
    for (;;) {
        int st;
        pid_t pid = wait(&st);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            _exit(1);
        }
        if (pid == server) {
            logmsg("agent server exited");
            _exit(1);
        }
    }
}
