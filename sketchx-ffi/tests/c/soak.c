/*
 * Soak run of the job pipeline through the C API (the counterpart of examples/soak.rs and
 * sketchx-py/tests/soak.py): JOBS small jobs on the tiny fixture models from THREADS pthreads, a queue of 4
 * (SKETCHX_QUEUE_FULL retried), cancels of queued and of running jobs (one job in 20 each). Checks: no job lost,
 * every job exactly one final state, never going backwards (the progress callback sees every change), image
 * files exactly for the completed jobs, no temporary file left, no failed job, memory flat (VmRSS after the
 * 100th finished job, or the first tenth of a shorter run, against the end). Then shutdown while a job runs,
 * others wait in the queue and threads block in sketchx_pipeline_wait: every waiter returns, every job is
 * cancelled, no file is left.
 *
 *   soak FIXTURES_DIR WORK_DIR [JOBS [THREADS]]     (WORK_DIR: an empty, writable directory; default 1000, 8)
 *
 * SKETCHX_SOAK_SKIP_RSS=1 skips the memory rule (for sanitizer builds, whose allocator keeps freed memory).
 *
 * Prints one "SOAK binding=c ..." line (scripts/soak tabulates it), a line per broken rule, and exits with 1
 * when any rule broke. scripts/c-tests runs it with 100 jobs under ASan/UBSan.
 */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "sketchx.h"

static atomic_int violations;
#define VIOLATION(...)                                                                                   \
    do {                                                                                                 \
        violations++;                                                                                    \
        if (violations <= 50) {                                                                          \
            fprintf(stderr, "VIOLATION: " __VA_ARGS__);                                                  \
            fputc('\n', stderr);                                                                         \
        }                                                                                                \
    } while (0)

/* What the progress callback saw of one job. */
typedef struct {
    char id[SKETCHX_JOB_ID_LEN + 1];
    int rank;  /* highest rank seen: 0 queued, 1 running, 2 final */
    int final; /* first final state seen, -1 none */
    int finals;
} seen_job;

static seen_job *table;
static size_t table_len;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static int rank_of(sketchx_job_state s) {
    return s == SKETCHX_STATE_QUEUED ? 0 : s == SKETCHX_STATE_RUNNING ? 1 : 2;
}

/* The slot of `id` (open addressing on its first hex digits); table_lock held. */
static seen_job *slot(const char *id) {
    char head[17];
    memcpy(head, id, 16);
    head[16] = '\0';
    size_t h = (size_t)strtoull(head, NULL, 16) % table_len;
    for (size_t i = 0; i < table_len; i++) {
        seen_job *s = &table[(h + i) % table_len];
        if (s->id[0] == '\0') {
            memcpy(s->id, id, SKETCHX_JOB_ID_LEN + 1);
            s->final = -1;
            return s;
        }
        if (strcmp(s->id, id) == 0) return s;
    }
    return NULL;
}

static void on_progress(const sketchx_job_info *info, void *user_data) {
    (void)user_data;
    pthread_mutex_lock(&table_lock);
    seen_job *s = slot(info->job_id.id);
    if (s == NULL) {
        VIOLATION("the callback table is full");
    } else {
        int r = rank_of(info->state);
        if (r < s->rank) VIOLATION("%s: event state %d after a later state", s->id, (int)info->state);
        if (r == 2) {
            if (s->final < 0) {
                s->final = (int)info->state;
                s->finals++;
            } else if (s->final != (int)info->state) {
                VIOLATION("%s: final state %d after final state %d", s->id, (int)info->state, s->final);
            }
        }
        if (r > s->rank) s->rank = r;
    }
    pthread_mutex_unlock(&table_lock);
}

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = 0;
    if (!f) return 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) kib = strtol(line + 6, NULL, 10);
    fclose(f);
    return kib;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_us(long us) {
    struct timespec t = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&t, NULL);
}

typedef struct {
    sketchx_job_id id;
    sketchx_job_state state;
    size_t images;
} job_result;

static sketchx_pipeline *pipe_;
static const char *sketch_path;
static int jobs, early_at;
static atomic_int next_job, finished, cancels, queue_full, failed_calls;
static atomic_long rss_early;
static job_result *results;

static uint64_t mix(uint64_t x) { /* splitmix64: the cancel plan, repeatable */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static void *client(void *arg) {
    (void)arg;
    for (;;) {
        int n = atomic_fetch_add(&next_job, 1);
        if (n >= jobs) return NULL;
        char prompt[64];
        snprintf(prompt, sizeof prompt, "soak job %d", n);
        sketchx_request req;
        sketchx_request_init(&req);
        req.prompt = prompt;
        req.steps = 1 + (uint32_t)(n % 2);
        req.width = 64;
        req.height = 64;
        req.has_seed = 1;
        req.seed = (uint64_t)n;
        sketchx_job_id id;
        sketchx_result r;
        while ((r = sketchx_pipeline_submit_file(pipe_, &req, sketch_path, &id)) == SKETCHX_QUEUE_FULL) {
            atomic_fetch_add(&queue_full, 1);
            sleep_us(10000);
        }
        if (r != SKETCHX_OK) {
            VIOLATION("job %d: submit: %s: %s", n, sketchx_result_name(r), sketchx_last_error_message());
            atomic_fetch_add(&failed_calls, 1);
            atomic_fetch_add(&finished, 1);
            continue;
        }
        uint64_t roll = mix((uint64_t)n) % 20;
        if (roll == 0) {
            atomic_fetch_add(&cancels, 1);
            sketchx_pipeline_cancel(pipe_, id.id, NULL);
        } else if (roll == 1) {
            sketchx_job_info info;
            double deadline = now_s() + 60;
            while (sketchx_pipeline_poll(pipe_, id.id, &info) == SKETCHX_OK && info.state == SKETCHX_STATE_QUEUED &&
                   now_s() < deadline)
                sleep_us(200);
            atomic_fetch_add(&cancels, 1);
            sketchx_pipeline_cancel(pipe_, id.id, NULL);
        }
        sketchx_status *st = NULL;
        r = sketchx_pipeline_wait(pipe_, id.id, 300000, &st);
        if (r != SKETCHX_OK) {
            VIOLATION("job %d: wait: %s", n, sketchx_result_name(r));
        } else {
            sketchx_job_info info;
            sketchx_status_info(st, &info);
            results[n].id = id;
            results[n].state = info.state;
            results[n].images = sketchx_status_image_count(st);
            if (info.state == SKETCHX_STATE_FAILED) VIOLATION("%s: failed: %s", id.id, sketchx_status_message(st));
            for (size_t i = 0; i < results[n].images; i++) {
                struct stat sb;
                const char *path = sketchx_status_image_path(st, i);
                if (path == NULL || stat(path, &sb) != 0 || !S_ISREG(sb.st_mode))
                    VIOLATION("%s: its image %s is missing", id.id, path ? path : "(null)");
            }
            sketchx_status_free(st);
        }
        if (atomic_fetch_add(&finished, 1) + 1 == early_at) atomic_store(&rss_early, rss_kib());
    }
}

/* Entries of `dir` (hidden ones included); `hidden` receives how many start with '.'. */
static size_t count_entries(const char *dir, size_t *hidden) {
    DIR *d = opendir(dir);
    size_t n = 0;
    *hidden = 0;
    if (!d) return 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        n++;
        if (e->d_name[0] == '.') (*hidden)++;
    }
    closedir(d);
    return n;
}

static void *waiter(void *arg) {
    sketchx_status *st = NULL;
    sketchx_result r = sketchx_pipeline_wait(pipe_, ((sketchx_job_id *)arg)->id, 120000, &st);
    long state = -1;
    if (r == SKETCHX_OK) {
        sketchx_job_info info;
        sketchx_status_info(st, &info);
        state = (long)info.state;
        sketchx_status_free(st);
    }
    return (void *)state;
}

/* Shutdown while a job runs, four wait in the queue and a thread waits on each. */
static void shutdown_while_running(const char *fixtures, const char *out_dir) {
    char sd[4096], cn[4096];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    if (sketchx_pipeline_new(&opt, &pipe_) != SKETCHX_OK) {
        VIOLATION("shutdown case: pipeline: %s", sketchx_last_error_message());
        return;
    }
    sketchx_request req;
    sketchx_request_init(&req);
    req.prompt = "a house";
    req.steps = 150;
    req.width = 128;
    req.height = 128;
    sketchx_job_id ids[5];
    pthread_t threads[5];
    for (int i = 0; i < 5; i++) {
        if (sketchx_pipeline_submit_file(pipe_, &req, sketch_path, &ids[i]) != SKETCHX_OK)
            VIOLATION("shutdown case: submit: %s", sketchx_last_error_message());
    }
    sketchx_job_info info = {0};
    double deadline = now_s() + 120;
    while (sketchx_pipeline_poll(pipe_, ids[0].id, &info) == SKETCHX_OK && info.state == SKETCHX_STATE_QUEUED &&
           now_s() < deadline)
        sleep_us(1000);
    if (info.state != SKETCHX_STATE_RUNNING) VIOLATION("shutdown case: the first job never ran");
    for (int i = 0; i < 5; i++) pthread_create(&threads[i], NULL, waiter, &ids[i]);
    sleep_us(50000);
    if (sketchx_pipeline_shutdown(pipe_) != SKETCHX_OK) VIOLATION("shutdown: %s", sketchx_last_error_message());
    for (int i = 0; i < 5; i++) {
        void *state;
        pthread_join(threads[i], &state);
        if ((long)state != (long)SKETCHX_STATE_CANCELLED)
            VIOLATION("shutdown case: job %d ended in state %ld, not cancelled", i, (long)state);
    }
    size_t hidden, n = count_entries(out_dir, &hidden);
    if (n != 0) VIOLATION("shutdown case: %zu files left in %s", n, out_dir);
    sketchx_job_id late;
    if (sketchx_pipeline_submit_file(pipe_, &req, sketch_path, &late) != SKETCHX_SHUT_DOWN)
        VIOLATION("shutdown case: a submission after shutdown was not SKETCHX_SHUT_DOWN");
    sketchx_pipeline_free(pipe_);
    pipe_ = NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: soak FIXTURES_DIR WORK_DIR [JOBS [THREADS]]\n");
        return 2;
    }
    const char *fixtures = argv[1], *work = argv[2];
    jobs = argc > 3 ? atoi(argv[3]) : 1000;
    int threads = argc > 4 ? atoi(argv[4]) : 8;
    if (jobs < 1 || threads < 1 || threads > 256) {
        fprintf(stderr, "soak: JOBS and THREADS must be positive (THREADS at most 256)\n");
        return 2;
    }
    early_at = jobs / 10 < 100 ? (jobs + 9) / 10 : 100;
    char sd[4096], cn[4096], sketch[4096], out[4096], out2[4096];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch, sizeof sketch, "%s/sketches/house_black_on_white.png", fixtures);
    snprintf(out, sizeof out, "%s/soak-out", work);
    snprintf(out2, sizeof out2, "%s/shutdown-out", work);
    sketch_path = sketch;
    table_len = 2 * (size_t)jobs + 16;
    table = calloc(table_len, sizeof *table);
    results = calloc((size_t)jobs, sizeof *results);

    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out;
    opt.queue_capacity = 4;
    opt.cleanup_interval_secs = 0;
    opt.preview_every = 0;
    opt.progress_callback = on_progress;
    if (sketchx_pipeline_new(&opt, &pipe_) != SKETCHX_OK) {
        fprintf(stderr, "soak: %s\n", sketchx_last_error_message());
        return 2;
    }
    double started = now_s();
    pthread_t tids[256];
    for (int i = 0; i < threads; i++) pthread_create(&tids[i], NULL, client, NULL);
    for (int i = 0; i < threads; i++) pthread_join(tids[i], NULL);
    double wall = now_s() - started;
    long rss_end = rss_kib();

    int completed = 0, failed = 0, cancelled = 0;
    size_t images = 0;
    for (int n = 0; n < jobs; n++) {
        job_result *r = &results[n];
        if (r->id.id[0] == '\0') continue; /* reported above */
        switch (r->state) {
        case SKETCHX_STATE_COMPLETED: completed++, images += r->images; break;
        case SKETCHX_STATE_FAILED: failed++; break;
        case SKETCHX_STATE_CANCELLED: cancelled++; break;
        default: VIOLATION("%s: wait returned state %d", r->id.id, (int)r->state);
        }
        pthread_mutex_lock(&table_lock);
        seen_job *s = slot(r->id.id);
        if (s == NULL || s->finals != 1 || s->final != (int)r->state)
            VIOLATION("%s: ended in state %d, its events: %d final(s), first %d", r->id.id, (int)r->state,
                      s ? s->finals : -1, s ? s->final : -1);
        pthread_mutex_unlock(&table_lock);
    }
    if (completed + failed + cancelled != jobs)
        VIOLATION("%d jobs asked, %d finished", jobs, completed + failed + cancelled);
    size_t hidden, entries = count_entries(out, &hidden);
    if (entries != images || hidden != 0)
        VIOLATION("%zu files (%zu hidden) in %s for %zu images of completed jobs", entries, hidden, out, images);
    long early = atomic_load(&rss_early);
    /* Under ASan, freed memory waits in its quarantine (256 MiB), so RSS grows without a leak; LeakSanitizer
     * checks leaks there instead. */
    const char *skip_rss = getenv("SKETCHX_SOAK_SKIP_RSS");
    if (skip_rss != NULL && skip_rss[0] != '\0')
        fprintf(stderr, "soak: memory rule skipped (SKETCHX_SOAK_SKIP_RSS is set)\n");
    else if (rss_end > early + early / 10 + 8 * 1024)
        VIOLATION("memory grew from %ld KiB (job %d) to %ld KiB (job %d)", early, early_at, rss_end, jobs);
    sketchx_pipeline_free(pipe_);
    pipe_ = NULL;

    shutdown_while_running(fixtures, out2);

    printf("SOAK binding=c jobs=%d cancels=%d completed=%d failed=%d cancelled=%d queue_full=%d wall_s=%.1f "
           "rss100_kib=%ld rss_end_kib=%ld\n",
           completed + failed + cancelled, atomic_load(&cancels), completed, failed, cancelled,
           atomic_load(&queue_full), wall, early, rss_end);
    free(table);
    free(results);
    if (violations) fprintf(stderr, "soak: %d violations\n", violations);
    return violations ? 1 : 0;
}
