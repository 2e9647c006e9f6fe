/*
 * Exercises the C API on the tiny fixture models, error paths first: NULL everywhere, invalid UTF-8, unknown
 * job ids, invalid parameters, bad sketches and models, buffers too small, calls after shutdown, and the frees
 * documented as safe (NULL, shutdown twice). Then a full job lifecycle: submit, progress callback, poll, wait,
 * the PNG bytes of a finished job, timeout, cancel, queue full, preview, cleanup, shutdown. Then the
 * `vae_tiling` option, textual inversion embeddings and clip skip. Last, the Redis client (and, with
 * SKETCHX_TEST_REDIS_URL, a worker serving it).
 *
 *   api_test FIXTURES_DIR WORK_DIR      (WORK_DIR: an empty, writable directory)
 *
 * Prints one line per failed check and a closing "api_test: N checks, N passed, F failed"; exit status 0 iff
 * every check passed. Built with -fsanitize=address,undefined and run under valgrind by scripts/c-tests.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sketchx.h"
#include "sketchx.h" /* including twice is harmless */

/* How long a test waits for a job: generous, because under valgrind on a busy 2-core machine a 2-step job can
 * take minutes; a hung job still fails the test instead of hanging it. */
#define JOB_WAIT_MS 1200000

static int checks, failures;

#define CHECK(cond)                                                                                      \
    do {                                                                                                 \
        checks++;                                                                                        \
        if (!(cond)) {                                                                                   \
            failures++;                                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond,             \
                    sketchx_last_error_message());                                                       \
        }                                                                                                \
    } while (0)

/* A call that must fail with `code`, leave a non-empty message, and (if `field` is not NULL) name the field. */
#define CHECK_ERR(call, code, field)                                                                     \
    do {                                                                                                 \
        sketchx_result r_ = (call);                                                                      \
        checks++;                                                                                        \
        if (r_ != (code) || sketchx_last_error_message()[0] == '\0' ||                                   \
            ((field) != NULL && strcmp(sketchx_last_error_field(), (field) ? (field) : "") != 0)) {     \
            failures++;                                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s gave %s (message \"%s\", field \"%s\"), expected %s %s\n",   \
                    __FILE__, __LINE__, #call, sketchx_result_name(r_), sketchx_last_error_message(),    \
                    sketchx_last_error_field(), sketchx_result_name(code), (field) ? (field) : "");      \
        }                                                                                                \
    } while (0)

#define CHECK_OK(call)                                                                                   \
    do {                                                                                                 \
        sketchx_result r_ = (call);                                                                      \
        checks++;                                                                                        \
        if (r_ != SKETCHX_OK || sketchx_last_error_message()[0] != '\0') {                               \
            failures++;                                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s gave %s: %s\n", __FILE__, __LINE__, #call,                   \
                    sketchx_result_name(r_), sketchx_last_error_message());                              \
        }                                                                                                \
    } while (0)

static const char BAD_UTF8[] = {'a', (char)0xff, 'b', 0};
static const char UNKNOWN_ID[] = "0123456789abcdef0123456789abcdef";

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Progress callback: counts events per state; runs on the worker thread (and the caller's, on submit). */
static atomic_int events, running_events, final_events;
static void on_progress(const sketchx_job_info *info, void *user_data) {
    atomic_fetch_add(&events, 1);
    if (info->state == SKETCHX_STATE_RUNNING) atomic_fetch_add(&running_events, 1);
    if (info->state >= SKETCHX_STATE_COMPLETED) atomic_fetch_add(&final_events, 1);
    if (strlen(info->job_id.id) != SKETCHX_JOB_ID_LEN) abort();
    *(int *)user_data = 1;
}

/* The last error is per thread: a failure on another thread leaves this thread's message alone. */
static void *fail_on_other_thread(void *arg) {
    (void)arg;
    sketchx_result r = sketchx_request_init(NULL);
    return (void *)(size_t)(r == SKETCHX_NULL_ARGUMENT && sketchx_last_error_message()[0] != '\0');
}

static void request_for_tests(sketchx_request *req, uint32_t steps) {
    sketchx_request_init(req);
    req->prompt = "a house";
    req->steps = steps;
    req->width = 64;
    req->height = 64;
    req->has_seed = 1;
    req->seed = 1;
}

static void test_static_functions(void) {
    CHECK(strcmp(sketchx_version(), SKETCHX_VERSION_STRING) == 0);
    char expect[32];
    snprintf(expect, sizeof expect, "%d.%d.%d", SKETCHX_VERSION_MAJOR, SKETCHX_VERSION_MINOR,
             SKETCHX_VERSION_PATCH);
    CHECK(strcmp(expect, SKETCHX_VERSION_STRING) == 0);
    CHECK(strcmp(sketchx_result_name(SKETCHX_OK), "SKETCHX_OK") == 0);
    CHECK(strcmp(sketchx_result_name(SKETCHX_QUEUE_FULL), "SKETCHX_QUEUE_FULL") == 0);
    CHECK(strcmp(sketchx_result_name(12345), "SKETCHX_UNKNOWN_RESULT") == 0);
    CHECK(SKETCHX_OK == 0 && SKETCHX_NULL_ARGUMENT == 1 && SKETCHX_BUFFER_TOO_SMALL == 19);
    CHECK(SKETCHX_STORE == 20 && SKETCHX_NOT_FINISHED == 21 && SKETCHX_INDEX_OUT_OF_RANGE == 22);
    CHECK(strcmp(sketchx_result_name(SKETCHX_NOT_FINISHED), "SKETCHX_NOT_FINISHED") == 0);
    CHECK(strcmp(sketchx_result_name(SKETCHX_INDEX_OUT_OF_RANGE), "SKETCHX_INDEX_OUT_OF_RANGE") == 0);

    /* _init with NULL */
    CHECK_ERR(sketchx_pipeline_options_init(NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_request_init(NULL), SKETCHX_NULL_ARGUMENT, "");

    /* a success clears the last error */
    sketchx_request req;
    CHECK_OK(sketchx_request_init(&req));
    CHECK(req.steps == 30 && req.num_images == 1 && req.temperature == 0.65 && req.guidance_scale == 7.5);
    CHECK(req.prompt == NULL && req.has_seed == 0 && req.width == 0 && req.guess_mode == -1);
    sketchx_pipeline_options opt;
    CHECK_OK(sketchx_pipeline_options_init(&opt));
    CHECK(opt.queue_capacity == 64 && opt.retention_secs == 3600 && opt.preview_every == 5);
    CHECK(opt.model == NULL && opt.progress_callback == NULL && opt.drain_on_shutdown == 0);
    CHECK(opt.vae_tiling == 0 && opt.redis_url == NULL);
    CHECK(strcmp(sketchx_result_name(SKETCHX_STORE), "SKETCHX_STORE") == 0 && SKETCHX_STORE == 20);

    /* thread-local last error */
    CHECK_ERR(sketchx_request_init(NULL), SKETCHX_NULL_ARGUMENT, "");
    char mine[256];
    snprintf(mine, sizeof mine, "%s", sketchx_last_error_message());
    pthread_t t;
    void *ok = NULL;
    pthread_create(&t, NULL, fail_on_other_thread, NULL);
    pthread_join(t, &ok);
    CHECK(ok != NULL);
    CHECK(strcmp(mine, sketchx_last_error_message()) == 0);

    /* the free functions accept NULL */
    sketchx_pipeline_free(NULL);
    sketchx_status_free(NULL);
    sketchx_bytes_free(NULL);
    /* byte buffer accessors on NULL */
    CHECK(sketchx_bytes_data(NULL) == NULL);
    CHECK(sketchx_bytes_len(NULL) == 0);
    /* status accessors on NULL */
    sketchx_job_info info;
    CHECK_ERR(sketchx_status_info(NULL, &info), SKETCHX_NULL_ARGUMENT, "");
    CHECK(sketchx_status_message(NULL) == NULL);
    CHECK(sketchx_status_json(NULL) == NULL);
    CHECK(sketchx_status_image_count(NULL) == 0);
    CHECK(sketchx_status_image_path(NULL, 0) == NULL);

    /* every pipeline function with a NULL pipeline */
    sketchx_job_id id;
    sketchx_status *st = NULL;
    size_t n;
    sketchx_preview_info pv;
    CHECK_ERR(sketchx_pipeline_submit_file(NULL, &req, "x.png", &id), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_submit_buffer(NULL, &req, (const uint8_t *)"x", 1, &id), SKETCHX_NULL_ARGUMENT,
              "");
    CHECK_ERR(sketchx_pipeline_poll(NULL, UNKNOWN_ID, &info), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_status(NULL, UNKNOWN_ID, &st), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_wait(NULL, UNKNOWN_ID, 0, &st), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_cancel(NULL, UNKNOWN_ID, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_preview(NULL, UNKNOWN_ID, NULL, 0, &pv), SKETCHX_NULL_ARGUMENT, "");
    sketchx_bytes *png = NULL;
    CHECK_ERR(sketchx_pipeline_image(NULL, UNKNOWN_ID, 0, &png), SKETCHX_NULL_ARGUMENT, "");
    CHECK(png == NULL);
    CHECK_ERR(sketchx_pipeline_cleanup(NULL, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_cleanup_older_than(NULL, 0, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_queued(NULL, &n), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_shutdown(NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK(st == NULL);
}

/* The PNG bytes of completed job `job_id` (status `st`, one image) from `sketchx_pipeline_image`: the same bytes
 * as the file at the status' path; argument errors and an index out of range leave `*out` alone. */
static void check_image_bytes(const sketchx_pipeline *p, const char *job_id, const sketchx_status *st) {
    sketchx_bytes *png = NULL;
    CHECK_ERR(sketchx_pipeline_image(p, job_id, 0, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_image(p, NULL, 0, &png), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_image(p, BAD_UTF8, 0, &png), SKETCHX_INVALID_UTF8, "");
    CHECK_ERR(sketchx_pipeline_image(p, UNKNOWN_ID, 0, &png), SKETCHX_UNKNOWN_JOB, "");
    CHECK_ERR(sketchx_pipeline_image(p, "nope", 0, &png), SKETCHX_UNKNOWN_JOB, "");
    CHECK_ERR(sketchx_pipeline_image(p, job_id, 1, &png), SKETCHX_INDEX_OUT_OF_RANGE, "");
    CHECK(strstr(sketchx_last_error_message(), "1 image") != NULL);
    CHECK(png == NULL);
    CHECK_OK(sketchx_pipeline_image(p, job_id, 0, &png));
    CHECK(png != NULL);
    if (png == NULL) return;
    size_t file_len = 0;
    char *file = read_file(sketchx_status_image_path(st, 0), &file_len);
    CHECK(file != NULL && sketchx_bytes_len(png) == file_len && file_len > 8);
    CHECK(memcmp(sketchx_bytes_data(png), "\x89PNG\r\n\x1a\n", 8) == 0);
    if (file != NULL && sketchx_bytes_len(png) == file_len)
        CHECK(memcmp(sketchx_bytes_data(png), file, file_len) == 0);
    free(file);
    sketchx_bytes_free(png);
}

static void test_pipeline_new_errors(const char *sd, const char *cn, const char *work) {
    sketchx_pipeline_options opt;
    sketchx_pipeline *p = (sketchx_pipeline *)0x1; /* must stay untouched on failure */
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = work;

    CHECK_ERR(sketchx_pipeline_new(NULL, &p), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_new(&opt, NULL), SKETCHX_NULL_ARGUMENT, "");

    sketchx_pipeline_options bad = opt;
    bad.model = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_INVALID_UTF8, "");
    bad = opt;
    bad.output_dir = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_INVALID_UTF8, "");
    bad = opt;
    bad.queue_capacity = 0;
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_INVALID_REQUEST, "queue_capacity");
    bad = opt;
    bad.device = "tpu";
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_INVALID_REQUEST, "device");
    bad = opt;
    bad.dtype = "f64x";
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_INVALID_REQUEST, "dtype");
    bad = opt;
    bad.device = "metal"; /* not in this build (CPU-only, or CUDA) */
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_DEVICE, "");
    bad = opt;
    bad.model = "/nonexistent/sketchx/model/dir";
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_MODEL_NOT_FOUND, "");
    bad = opt;
    bad.controlnet = work; /* an existing directory without a ControlNet in it */
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_MODEL_NOT_FOUND, "");

    char malformed[1024];
    snprintf(malformed, sizeof malformed, "%s/malformed-controlnet", work);
    mkdir(malformed, 0755);
    char cfg[1100];
    snprintf(cfg, sizeof cfg, "%s/config.json", malformed);
    FILE *f = fopen(cfg, "w");
    fputs("{ this is not JSON", f);
    fclose(f);
    bad = opt;
    bad.controlnet = malformed;
    CHECK_ERR(sketchx_pipeline_new(&bad, &p), SKETCHX_MODEL_MALFORMED, "");
    CHECK(p == (sketchx_pipeline *)0x1);
}

static void test_pipeline(const char *fixtures, const char *work) {
    char sd[1024], cn[1024], sketch_path[1024], out_dir[1100];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    snprintf(out_dir, sizeof out_dir, "%s/out", work);

    test_pipeline_new_errors(sd, cn, work);

    int called = 0;
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.queue_capacity = 2;
    opt.cleanup_interval_secs = 0;
    opt.preview_every = 1;
    opt.progress_callback = on_progress;
    opt.user_data = &called;
    sketchx_pipeline *p = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return;

    sketchx_request req;
    request_for_tests(&req, 2);
    sketchx_job_id id, untouched;
    memset(&untouched, 'z', sizeof untouched);
    id = untouched;
    size_t sketch_len = 0;
    char *sketch = read_file(sketch_path, &sketch_len);
    CHECK(sketch != NULL);

    /* submit: NULL arguments, bad UTF-8, invalid parameters, bad sketches; nothing is queued */
    CHECK_ERR(sketchx_pipeline_submit_file(p, NULL, sketch_path, &id), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, NULL, &id), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, sketch_path, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_submit_buffer(p, &req, NULL, 10, &id), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, BAD_UTF8, &id), SKETCHX_INVALID_UTF8, "");
    sketchx_request bad = req;
    bad.prompt = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_UTF8, "");
    bad = req;
    bad.negative_prompt = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_submit_buffer(p, &bad, (const uint8_t *)sketch, sketch_len, &id),
              SKETCHX_INVALID_UTF8, "");
    bad = req;
    bad.scheduler = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_UTF8, "");

    bad = req; bad.steps = 0;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "steps");
    bad = req; bad.steps = 151;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "steps");
    bad = req; bad.num_images = 9;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "num_images");
    bad = req; bad.guidance_scale = NAN;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "guidance_scale");
    bad = req; bad.temperature = 1.5;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "temperature");
    bad = req; bad.has_controlnet_scale = 1; bad.controlnet_scale = -1;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "controlnet_scale");
    bad = req; bad.width = 65;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "width");
    bad = req; bad.height = 4096;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "height");
    bad = req; bad.scheduler = "plms";
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "scheduler");
    bad = req; bad.preprocess = "hed";
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "preprocess");
    bad = req; bad.guess_mode = 7;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "guess_mode");
    bad = req; bad.control_guidance_start = 0.9; bad.control_guidance_end = 0.5;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "control_guidance_start");
    /* prompts are limited to 16 KiB (the core's MAX_PROMPT_BYTES) */
    static char long_prompt[16 * 1024 + 2];
    memset(long_prompt, 'x', 16 * 1024 + 1);
    bad = req; bad.prompt = long_prompt;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "prompt");
    bad = req; bad.negative_prompt = long_prompt;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "negative_prompt");

    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, "/nonexistent/sketch.png", &id), SKETCHX_INVALID_SKETCH, "");
    CHECK_ERR(sketchx_pipeline_submit_buffer(p, &req, (const uint8_t *)"not an image", 12, &id),
              SKETCHX_INVALID_SKETCH, "");
    CHECK_ERR(sketchx_pipeline_submit_buffer(p, &req, (const uint8_t *)"", 0, &id), SKETCHX_INVALID_SKETCH, "");
    CHECK_ERR(sketchx_pipeline_submit_buffer(p, &req, (const uint8_t *)sketch, sketch_len / 2, &id),
              SKETCHX_INVALID_SKETCH, "");
    CHECK(memcmp(&id, &untouched, sizeof id) == 0); /* out-parameters untouched on failure */
    size_t queued = 99;
    CHECK_OK(sketchx_pipeline_queued(p, &queued));
    CHECK(queued == 0);
    CHECK_ERR(sketchx_pipeline_queued(p, NULL), SKETCHX_NULL_ARGUMENT, "");

    /* unknown, malformed, NULL and non-UTF-8 job ids, for every function taking one */
    sketchx_job_info info;
    sketchx_status *st = NULL;
    sketchx_preview_info pv;
    int cancelled = -1;
    const char *ids[] = {UNKNOWN_ID, "not-a-job", "", "0123456789ABCDEF0123456789ABCDEF"};
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        CHECK_ERR(sketchx_pipeline_poll(p, ids[i], &info), SKETCHX_UNKNOWN_JOB, "");
        CHECK_ERR(sketchx_pipeline_status(p, ids[i], &st), SKETCHX_UNKNOWN_JOB, "");
        CHECK_ERR(sketchx_pipeline_wait(p, ids[i], 10, &st), SKETCHX_UNKNOWN_JOB, "");
        CHECK_ERR(sketchx_pipeline_cancel(p, ids[i], &cancelled), SKETCHX_UNKNOWN_JOB, "");
        CHECK_ERR(sketchx_pipeline_preview(p, ids[i], NULL, 0, &pv), SKETCHX_UNKNOWN_JOB, "");
    }
    CHECK_ERR(sketchx_pipeline_poll(p, NULL, &info), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_wait(p, NULL, 0, &st), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_cancel(p, NULL, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_poll(p, BAD_UTF8, &info), SKETCHX_INVALID_UTF8, "");
    CHECK_ERR(sketchx_pipeline_status(p, BAD_UTF8, &st), SKETCHX_INVALID_UTF8, "");
    CHECK(st == NULL && cancelled == -1);

    /* a job from a buffer: the whole lifecycle */
    CHECK_OK(sketchx_pipeline_submit_buffer(p, &req, (const uint8_t *)sketch, sketch_len, &id));
    CHECK(strlen(id.id) == SKETCHX_JOB_ID_LEN);
    CHECK_ERR(sketchx_pipeline_poll(p, id.id, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_status(p, id.id, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_wait(p, id.id, -1, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_preview(p, id.id, NULL, 0, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_OK(sketchx_pipeline_poll(p, id.id, &info));
    CHECK(strcmp(info.job_id.id, id.id) == 0 && info.total_steps == 2 && info.seed == 1);
    CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
    CHECK(st != NULL);
    if (st) {
        sketchx_job_info done;
        CHECK_ERR(sketchx_status_info(st, NULL), SKETCHX_NULL_ARGUMENT, "");
        CHECK_OK(sketchx_status_info(st, &done));
        CHECK(done.state == SKETCHX_STATE_COMPLETED && done.progress == 100.0 && done.step == 2);
        CHECK(done.width == 64 && done.height == 64 && done.image_count == 1 && done.queue_position == 0);
        CHECK(strcmp(sketchx_status_message(st), "Task completed successfully.") == 0);
        CHECK(sketchx_status_image_count(st) == 1);
        CHECK(sketchx_status_image_path(st, 0) != NULL && file_exists(sketchx_status_image_path(st, 0)));
        CHECK(sketchx_status_image_path(st, 1) == NULL);
        CHECK(strstr(sketchx_status_json(st), "\"status\":\"completed\"") != NULL);
        CHECK(strstr(sketchx_status_json(st), id.id) != NULL);
        check_image_bytes(p, id.id, st);
        sketchx_status_free(st);
        st = NULL;
    }
    /* the callback of the final state runs just after waiters are woken: give it a moment */
    for (int tries = 0; tries < 500 && atomic_load(&final_events) < 1; tries++) usleep(10000);
    CHECK(called == 1 && atomic_load(&running_events) >= 2 && atomic_load(&final_events) == 1);
    CHECK_OK(sketchx_pipeline_cancel(p, id.id, &cancelled));
    CHECK(cancelled == 0); /* already finished */
    CHECK_OK(sketchx_pipeline_cancel(p, id.id, NULL));
    CHECK_OK(sketchx_pipeline_preview(p, id.id, NULL, 0, &pv));
    CHECK(pv.available == 0); /* previews are dropped when a job finishes */

    /* a long job, a job queued behind it: timeout, preview, queue full, cancel */
    sketchx_request slow;
    request_for_tests(&slow, 150);
    sketchx_job_id a, b, extra[4];
    CHECK_OK(sketchx_pipeline_submit_file(p, &slow, sketch_path, &a));
    CHECK_OK(sketchx_pipeline_submit_file(p, &slow, sketch_path, &b));
    CHECK_ERR(sketchx_pipeline_wait(p, b.id, 0, &st), SKETCHX_TIMEOUT, "");
    CHECK(st == NULL);
    sketchx_result full = SKETCHX_OK;
    int submitted = 0;
    for (int i = 0; i < 4 && full == SKETCHX_OK; i++) {
        full = sketchx_pipeline_submit_file(p, &slow, sketch_path, &extra[i]);
        if (full == SKETCHX_OK) submitted++;
    }
    CHECK(full == SKETCHX_QUEUE_FULL && submitted <= 1);
    CHECK(strstr(sketchx_last_error_message(), "full") != NULL);
    CHECK_OK(sketchx_pipeline_poll(p, b.id, &info));
    CHECK(info.state == SKETCHX_STATE_QUEUED && info.queue_position >= 1 && info.progress == 0.0);
    sketchx_bytes *png = NULL;
    CHECK_ERR(sketchx_pipeline_image(p, b.id, 0, &png), SKETCHX_NOT_FINISHED, "");
    CHECK(png == NULL);

    /* wait until job a shows a preview */
    for (int tries = 0; tries < 6000; tries++) {
        if (sketchx_pipeline_preview(p, a.id, NULL, 0, &pv) != SKETCHX_OK || pv.available) break;
        usleep(10000);
    }
    CHECK(pv.available == 1 && pv.width == 8 && pv.height == 8 && pv.rgb_len == 8 * 8 * 3 && pv.step >= 1);
    if (pv.available) {
        uint8_t small[4];
        sketchx_preview_info pv2 = {0};
        CHECK_ERR(sketchx_pipeline_preview(p, a.id, small, sizeof small, &pv2), SKETCHX_BUFFER_TOO_SMALL, "");
        CHECK(pv2.available == 0); /* untouched */
        uint8_t *rgb = malloc(pv.rgb_len);
        CHECK_OK(sketchx_pipeline_preview(p, a.id, rgb, pv.rgb_len, &pv2));
        CHECK(pv2.available == 1 && pv2.rgb_len == pv.rgb_len);
        free(rgb);
    }
    CHECK_OK(sketchx_pipeline_poll(p, a.id, &info));
    CHECK(info.state == SKETCHX_STATE_RUNNING && info.step >= 1 && info.progress > 0.0);

    /* cancel the queued one (removed at once), then the running one (stops at its next step) */
    CHECK_OK(sketchx_pipeline_cancel(p, b.id, &cancelled));
    CHECK(cancelled == 1);
    CHECK_OK(sketchx_pipeline_poll(p, b.id, &info));
    CHECK(info.state == SKETCHX_STATE_CANCELLED);
    CHECK_ERR(sketchx_pipeline_image(p, b.id, 0, &png), SKETCHX_CANCELLED, "");
    for (int i = 0; i < submitted; i++) CHECK_OK(sketchx_pipeline_cancel(p, extra[i].id, NULL));
    CHECK_OK(sketchx_pipeline_cancel(p, a.id, &cancelled));
    CHECK(cancelled == 1);
    CHECK_OK(sketchx_pipeline_wait(p, a.id, JOB_WAIT_MS, &st));
    if (st) {
        sketchx_status_info(st, &info);
        CHECK(info.state == SKETCHX_STATE_CANCELLED && info.image_count == 0);
        CHECK(strcmp(sketchx_status_message(st), "Task was cancelled.") == 0);
        sketchx_status_free(st);
        st = NULL;
    }

    /* cleanup: removes the completed job's file and forgets it */
    sketchx_cleanup_report rep = {0};
    CHECK_OK(sketchx_pipeline_cleanup(p, NULL));
    CHECK_OK(sketchx_pipeline_cleanup(p, &rep));
    CHECK(rep.files_removed == 0); /* younger than the retention period */
    CHECK_OK(sketchx_pipeline_cleanup_older_than(p, 0, &rep));
    CHECK(rep.files_removed == 1 && rep.bytes_removed > 0 && rep.jobs_forgotten >= 1);
    CHECK_ERR(sketchx_pipeline_poll(p, id.id, &info), SKETCHX_UNKNOWN_JOB, "");
    CHECK_ERR(sketchx_pipeline_image(p, id.id, 0, &png), SKETCHX_UNKNOWN_JOB, "");
    CHECK(png == NULL);
    CHECK_ERR(sketchx_pipeline_poll(p, a.id, &info), SKETCHX_UNKNOWN_JOB, ""); /* no files, finished: forgotten */

    /* shutdown: idempotent; later submissions fail; the handle stays usable until freed */
    CHECK_OK(sketchx_pipeline_shutdown(p));
    CHECK_OK(sketchx_pipeline_shutdown(p));
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, sketch_path, &id), SKETCHX_SHUT_DOWN, "");
    CHECK_OK(sketchx_pipeline_queued(p, &queued));
    CHECK(queued == 0);
    CHECK_ERR(sketchx_pipeline_poll(p, UNKNOWN_ID, &info), SKETCHX_UNKNOWN_JOB, "");
    sketchx_pipeline_free(p);
    sketchx_pipeline_free(NULL);
    free(sketch);
}

/* One 2-step job of `width` x `height` on a pipeline with `vae_tiling`; returns the PNG's bytes (malloc'd). */
static char *generate_png(const char *sd, const char *cn, const char *out_dir, int vae_tiling, uint32_t width,
                          uint32_t height, const char *sketch_path, size_t *len) {
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    opt.vae_tiling = vae_tiling;
    sketchx_pipeline *p = NULL;
    char *png = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return NULL;
    sketchx_request req;
    request_for_tests(&req, 2);
    req.width = width;
    req.height = height;
    sketchx_job_id id;
    sketchx_status *st = NULL;
    CHECK_OK(sketchx_pipeline_submit_file(p, &req, sketch_path, &id));
    CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
    if (st != NULL && sketchx_status_image_count(st) == 1) png = read_file(sketchx_status_image_path(st, 0), len);
    CHECK(png != NULL);
    sketchx_status_free(st);
    sketchx_pipeline_free(p);
    return png;
}

/* vae_tiling: an image larger than one VAE tile (the tiny VAE's tiles are 64x64 pixels) decodes differently
 * (tiles blended at the seams), one that fits in a tile decodes exactly as without tiling. */
static void test_vae_tiling(const char *fixtures, const char *work) {
    char sd[1024], cn[1024], sketch_path[1024], out_dir[1100];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    snprintf(out_dir, sizeof out_dir, "%s/out-tiling", work);
    const uint32_t sizes[2][2] = {{128, 96}, {64, 64}};
    for (int s = 0; s < 2; s++) {
        size_t n_plain = 0, n_tiled = 0;
        char *plain = generate_png(sd, cn, out_dir, 0, sizes[s][0], sizes[s][1], sketch_path, &n_plain);
        char *tiled = generate_png(sd, cn, out_dir, 1, sizes[s][0], sizes[s][1], sketch_path, &n_tiled);
        if (plain != NULL && tiled != NULL) {
            int same = n_plain == n_tiled && memcmp(plain, tiled, n_plain) == 0;
            if (s == 0) CHECK(!same); /* 128x96: 2 x 3 tiles */
            else CHECK(same);         /* 64x64: one tile, not tiled */
        }
        free(plain);
        free(tiled);
    }
}

/* One 2-step LCM job (64x64, seed 1) on a pipeline with `lora` (NULL: none) and the tiny VAE; `vae` and `eta`
 * as given. Returns the PNG's bytes (malloc'd), NULL on failure. */
static char *few_step_png(const char *fixtures, const char *out_dir, const char *lora, const char *vae, double eta,
                          size_t *len) {
    char sd[1024], cn[1024], taesd[1024], sketch_path[1024];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(taesd, sizeof taesd, "%s/tiny-taesd", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    const char *loras[1] = {lora};
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    opt.tiny_vae = taesd;
    opt.loras = lora != NULL ? loras : NULL;
    opt.lora_count = lora != NULL ? 1 : 0;
    sketchx_pipeline *p = NULL;
    char *png = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return NULL;
    sketchx_request req;
    request_for_tests(&req, 2);
    req.scheduler = "lcm";
    req.timestep_spacing = "trailing";
    req.vae = vae;
    req.eta = eta;
    sketchx_job_id id;
    sketchx_status *st = NULL;
    CHECK_OK(sketchx_pipeline_submit_file(p, &req, sketch_path, &id));
    CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
    if (st != NULL && sketchx_status_image_count(st) == 1) png = read_file(sketchx_status_image_path(st, 0), len);
    CHECK(png != NULL);
    sketchx_status_free(st);
    sketchx_pipeline_free(p);
    return png;
}

/* The few-step options and request fields: a LoRA changes the image, bad LoRAs and out-of-range fields are named. */
static void test_few_step(const char *fixtures, const char *work) {
    sketchx_request req;
    sketchx_pipeline_options opt;
    sketchx_request_init(&req);
    sketchx_pipeline_options_init(&opt);
    CHECK(req.timestep_spacing == NULL && req.vae == NULL && req.eta == 0.0);
    CHECK(opt.tiny_vae == NULL && opt.loras == NULL && opt.lora_count == 0);

    char out_dir[1100], lora[1100];
    snprintf(out_dir, sizeof out_dir, "%s/out-few-step", work);
    snprintf(lora, sizeof lora, "%s/lora/kohya.safetensors:0.6", fixtures);
    size_t n_plain = 0, n_lora = 0, n_tiny = 0;
    char *plain = few_step_png(fixtures, out_dir, NULL, NULL, 0.0, &n_plain);
    char *with_lora = few_step_png(fixtures, out_dir, lora, NULL, 0.0, &n_lora);
    char *tiny = few_step_png(fixtures, out_dir, NULL, "TINY", 0.0, &n_tiny);
    if (plain != NULL && with_lora != NULL) CHECK(n_plain != n_lora || memcmp(plain, with_lora, n_plain) != 0);
    if (plain != NULL && tiny != NULL) CHECK(n_plain != n_tiny || memcmp(plain, tiny, n_plain) != 0);
    free(plain);
    free(with_lora);
    free(tiny);

    char sd[1024], cn[1024], bad_scale[1100], missing[1100], unknown_key[1100], sketch_path[1024];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(bad_scale, sizeof bad_scale, "%s/lora/kohya.safetensors:11", fixtures);
    snprintf(missing, sizeof missing, "%s/lora/missing.safetensors", fixtures);
    snprintf(unknown_key, sizeof unknown_key, "%s/lora/bad/unknown_key.safetensors", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    sketchx_pipeline *p = (sketchx_pipeline *)0x1;
    const char *loras[1] = {bad_scale};
    opt.loras = loras;
    opt.lora_count = 1;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_INVALID_REQUEST, "loras.scale");
    loras[0] = missing;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_NOT_FOUND, "");
    CHECK(strstr(sketchx_last_error_message(), "missing.safetensors") != NULL);
    loras[0] = unknown_key;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_MALFORMED, "");
    CHECK(strstr(sketchx_last_error_message(), "unknown_key.safetensors") != NULL);
    loras[0] = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_INVALID_UTF8, "");
    opt.loras = NULL;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_NULL_ARGUMENT, "");
    CHECK(p == (sketchx_pipeline *)0x1);

    opt.lora_count = 0;
    p = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return;
    sketchx_job_id id;
    request_for_tests(&req, 2);
    sketchx_request bad = req;
    bad.eta = 1.5;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "eta");
    bad = req;
    bad.timestep_spacing = "sideways";
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "timestep_spacing");
    bad = req;
    bad.vae = "huge";
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "vae");
    bad = req;
    bad.vae = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_UTF8, "");
    sketchx_pipeline_free(p);
}

/* One 2-step job with `prompt` / `negative_prompt` and `clip_skip` on a pipeline with `embedding_count`
 * embeddings. Returns the PNG's bytes (malloc'd), NULL on failure. */
static char *embedding_png(const char *fixtures, const char *out_dir, const char *const *embeddings,
                           size_t embedding_count, const char *prompt, const char *negative_prompt,
                           uint32_t clip_skip, size_t *len) {
    char sd[1024], cn[1024], sketch_path[1024];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    opt.embeddings = embeddings;
    opt.embedding_count = embedding_count;
    sketchx_pipeline *p = NULL;
    char *png = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return NULL;
    sketchx_request req;
    request_for_tests(&req, 2);
    req.prompt = prompt;
    req.negative_prompt = negative_prompt;
    req.clip_skip = clip_skip;
    sketchx_job_id id;
    sketchx_status *st = NULL;
    CHECK_OK(sketchx_pipeline_submit_file(p, &req, sketch_path, &id));
    CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
    if (st != NULL && sketchx_status_image_count(st) == 1) png = read_file(sketchx_status_image_path(st, 0), len);
    CHECK(png != NULL);
    sketchx_status_free(st);
    sketchx_pipeline_free(p);
    return png;
}

/* Textual inversion embeddings (options) and clip skip (request): each changes the image; a token already in the
 * vocabulary, a missing file and out-of-range clip skips are refused by name. */
static void test_textual_inversion(const char *fixtures, const char *work) {
    sketchx_request req;
    sketchx_pipeline_options opt;
    sketchx_request_init(&req);
    sketchx_pipeline_options_init(&opt);
    CHECK(req.clip_skip == 0 && opt.embeddings == NULL && opt.embedding_count == 0);

    char out_dir[1100], neg[1100], cat[1100], taken[1100], missing[1100];
    snprintf(out_dir, sizeof out_dir, "%s/out-ti", work);
    snprintf(neg, sizeof neg, "%s/formats/textual_inversion/tiny-neg.safetensors:tinyneg", fixtures);
    snprintf(cat, sizeof cat, "%s/formats/textual_inversion/learned_embeds.safetensors", fixtures);
    snprintf(taken, sizeof taken, "%s/formats/textual_inversion/learned_embeds.safetensors:cat", fixtures);
    snprintf(missing, sizeof missing, "%s/formats/textual_inversion/missing.pt:tok", fixtures);
    const char *both[2] = {neg, cat};
    size_t n_plain = 0, n_ti = 0, n_skip = 0;
    char *plain = embedding_png(fixtures, out_dir, NULL, 0, "a <tiny-cat> house", "tinyneg, lowres", 0, &n_plain);
    char *ti = embedding_png(fixtures, out_dir, both, 2, "a <tiny-cat> house", "tinyneg, lowres", 0, &n_ti);
    char *skip = embedding_png(fixtures, out_dir, both, 2, "a <tiny-cat> house", "tinyneg, lowres", 1, &n_skip);
    if (plain != NULL && ti != NULL) CHECK(n_plain != n_ti || memcmp(plain, ti, n_plain) != 0);
    if (ti != NULL && skip != NULL) CHECK(n_ti != n_skip || memcmp(ti, skip, n_ti) != 0);
    free(plain);
    free(ti);
    free(skip);

    char sd[1024], cn[1024], sketch_path[1024];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_black_on_white.png", fixtures);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    sketchx_pipeline *p = (sketchx_pipeline *)0x1;
    const char *bad[1] = {taken};
    opt.embeddings = bad;
    opt.embedding_count = 1;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_MALFORMED, "");
    CHECK(strstr(sketchx_last_error_message(), "learned_embeds.safetensors") != NULL);
    CHECK(strstr(sketchx_last_error_message(), "cat") != NULL);
    bad[0] = missing;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_NOT_FOUND, "");
    CHECK(strstr(sketchx_last_error_message(), "missing.pt") != NULL);
    bad[0] = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_INVALID_UTF8, "");
    opt.embeddings = NULL;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_NULL_ARGUMENT, "");
    CHECK(p == (sketchx_pipeline *)0x1);

    opt.embedding_count = 0;
    p = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return;
    sketchx_job_id id;
    request_for_tests(&req, 2);
    req.clip_skip = 13; /* beyond the request's range */
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, sketch_path, &id), SKETCHX_INVALID_REQUEST, "clip_skip");
    req.clip_skip = 3; /* beyond the tiny text encoder's 2 layers */
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, sketch_path, &id), SKETCHX_INVALID_REQUEST, "clip_skip");
    sketchx_pipeline_free(p);
}

/* Single files: a checkpoint with its config folder, an original-format ControlNet and a VAE file load; a file of
 * another family is refused with SKETCHX_MODEL_UNSUPPORTED naming it; a missing yaml is SKETCHX_MODEL_NOT_FOUND. */
static void test_single_file(const char *fixtures, const char *work) {
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    CHECK(opt.model_config == NULL && opt.original_config == NULL && opt.extract_ema == 0);
    CHECK(opt.controlnet_config == NULL && opt.vae == NULL);
    char model[1100], config[1100], cn[1100], vae[1100], sd2[1100], out_dir[1100];
    snprintf(model, sizeof model, "%s/formats/single_file/tiny-sd-ema.ckpt", fixtures);
    snprintf(config, sizeof config, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/formats/single_file/tiny-controlnet.pth", fixtures);
    snprintf(vae, sizeof vae, "%s/formats/single_file/tiny-vae-alt.safetensors", fixtures);
    snprintf(sd2, sizeof sd2, "%s/formats/bad/sd2.safetensors", fixtures);
    snprintf(out_dir, sizeof out_dir, "%s/out-single-file", work);
    opt.model = model;
    opt.model_config = config;
    opt.extract_ema = 1;
    opt.controlnet = cn;
    opt.vae = vae;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    sketchx_pipeline *p = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    sketchx_pipeline_free(p);
    opt.model = sd2;
    p = (sketchx_pipeline *)0x1;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_UNSUPPORTED, "");
    CHECK(strstr(sketchx_last_error_message(), "sd2.safetensors") != NULL);
    CHECK(strstr(sketchx_last_error_message(), "cond_stage_model.model.") != NULL);
    CHECK(p == (sketchx_pipeline *)0x1);
    opt.model = model;
    opt.model_config = NULL;
    opt.original_config = "/no/such/v1-inference.yaml";
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_MODEL_NOT_FOUND, "");
    opt.original_config = BAD_UTF8;
    CHECK_ERR(sketchx_pipeline_new(&opt, &p), SKETCHX_INVALID_UTF8, "");
}

/* The Redis client: argument errors and an unreachable server without one; with SKETCHX_TEST_REDIS_URL set (as
 * scripts/test does), a client that refuses bad input and unknown ids and queues a job. */
static void test_redis_client(const char *fixtures, const char *work) {
    sketchx_pipeline *p = NULL;
    CHECK_ERR(sketchx_pipeline_connect(NULL, 4, &p), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_connect("redis://127.0.0.1:1", 4, NULL), SKETCHX_NULL_ARGUMENT, "");
    CHECK_ERR(sketchx_pipeline_connect(BAD_UTF8, 4, &p), SKETCHX_INVALID_UTF8, "");
    CHECK_ERR(sketchx_pipeline_connect("redis://127.0.0.1:1", 4, &p), SKETCHX_STORE, "");
    CHECK(p == NULL);
    const char *url = getenv("SKETCHX_TEST_REDIS_URL");
    if (url == NULL || url[0] == 0) {
        printf("api_test: SKIPPED the Redis client checks: SKETCHX_TEST_REDIS_URL is not set\n");
        return;
    }
    CHECK_ERR(sketchx_pipeline_connect(url, 0, &p), SKETCHX_INVALID_REQUEST, "queue_capacity");
    CHECK_OK(sketchx_pipeline_connect(url, 4, &p));
    sketchx_job_info info;
    CHECK_ERR(sketchx_pipeline_poll(p, UNKNOWN_ID, &info), SKETCHX_UNKNOWN_JOB, "");
    sketchx_request req;
    request_for_tests(&req, 2);
    char sketch[4096];
    snprintf(sketch, sizeof sketch, "%s/sketches/house_black_on_white.png", fixtures);
    sketchx_job_id id;
    req.steps = 0;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &req, sketch, &id), SKETCHX_INVALID_REQUEST, "steps");
    req.steps = 2;
    CHECK_OK(sketchx_pipeline_submit_file(p, &req, sketch, &id));
    CHECK_OK(sketchx_pipeline_poll(p, id.id, &info));
    CHECK(info.state == SKETCHX_STATE_QUEUED);
    sketchx_bytes *png = NULL;
    CHECK_ERR(sketchx_pipeline_image(p, id.id, 0, &png), SKETCHX_NOT_FINISHED, "");
    CHECK_ERR(sketchx_pipeline_image(p, UNKNOWN_ID, 0, &png), SKETCHX_UNKNOWN_JOB, "");
    int cancelled = 0;
    CHECK_OK(sketchx_pipeline_cancel(p, id.id, &cancelled));
    CHECK(cancelled == 1);
    CHECK_OK(sketchx_pipeline_poll(p, id.id, &info));
    CHECK(info.state == SKETCHX_STATE_CANCELLED);
    CHECK_ERR(sketchx_pipeline_image(p, id.id, 0, &png), SKETCHX_CANCELLED, "");
    CHECK(png == NULL);

    /* A worker of the same queue (options.redis_url, its own output directory) runs the client's next job; the
     * client gets the PNG bytes from Redis (the same as the worker's file). */
    char sd[1024], cn[1024], out_dir[1100];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(out_dir, sizeof out_dir, "%s/out-redis-worker", work);
    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    opt.redis_url = url;
    sketchx_pipeline *worker = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &worker));
    if (worker != NULL) {
        CHECK_OK(sketchx_pipeline_submit_file(p, &req, sketch, &id));
        sketchx_status *st = NULL;
        CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
        if (st != NULL) {
            CHECK_OK(sketchx_status_info(st, &info));
            CHECK(info.state == SKETCHX_STATE_COMPLETED && info.image_count == 1);
            if (info.image_count == 1) check_image_bytes(p, id.id, st);
            sketchx_status_free(st);
        }
        sketchx_pipeline_free(worker);
    }
    sketchx_pipeline_free(p);
}

/* One 4-step job on tiny-sd with `req` (its size, seed and steps set here); returns the PNG's bytes (malloc'd). */
static char *img2img_png(sketchx_pipeline *p, sketchx_request *req, const char *sketch_path, size_t *len) {
    sketchx_job_id id;
    sketchx_status *st = NULL;
    char *png = NULL;
    req->prompt = "a house";
    req->steps = 4;
    req->width = 64;
    req->height = 64;
    req->has_seed = 1;
    req->seed = 3;
    CHECK_OK(sketchx_pipeline_submit_file(p, req, sketch_path, &id));
    CHECK_OK(sketchx_pipeline_wait(p, id.id, JOB_WAIT_MS, &st));
    if (st != NULL && sketchx_status_image_count(st) == 1) png = read_file(sketchx_status_image_path(st, 0), len);
    CHECK(png != NULL);
    sketchx_status_free(st);
    return png;
}

/* img2img (the sketch's colours, another image's bytes) and the lineart / canny preprocessors: defaults, each
 * changes the image, bad values are named. */
static void test_img2img_and_preprocess(const char *fixtures, const char *work) {
    char sd[1024], cn[1024], sketch_path[1024], other_path[1024], out_dir[1100];
    snprintf(sd, sizeof sd, "%s/tiny-sd", fixtures);
    snprintf(cn, sizeof cn, "%s/tiny-controlnet", fixtures);
    snprintf(sketch_path, sizeof sketch_path, "%s/sketches/house_colour.png", fixtures);
    snprintf(other_path, sizeof other_path, "%s/sketches/house_colour_alt.png", fixtures);
    snprintf(out_dir, sizeof out_dir, "%s/out-img2img", work);
    sketchx_request req;
    sketchx_request_init(&req);
    CHECK(req.start_image == NULL && req.start_image_len == 0 && req.start_image_from_sketch == 0);
    CHECK(req.strength == 0.8 && req.canny_low_threshold == 100 && req.canny_high_threshold == 200);

    sketchx_pipeline_options opt;
    sketchx_pipeline_options_init(&opt);
    opt.model = sd;
    opt.controlnet = cn;
    opt.output_dir = out_dir;
    opt.cleanup_interval_secs = 0;
    sketchx_pipeline *p = NULL;
    CHECK_OK(sketchx_pipeline_new(&opt, &p));
    if (p == NULL) return;
    size_t other_len = 0;
    char *other = read_file(other_path, &other_len);
    CHECK(other != NULL);

    sketchx_job_id id;
    sketchx_request bad;
    sketchx_request_init(&bad);
    bad.start_image_from_sketch = 1;
    bad.strength = 1.5;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "strength");
    bad.strength = NAN;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "strength");
    bad.strength = 0.01; /* int(30 * 0.01) = 0 steps */
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "strength");
    sketchx_request_init(&bad);
    bad.start_image = (const uint8_t *)"not an image";
    bad.start_image_len = 12;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "start_image");
    bad.start_image_from_sketch = 1;
    bad.start_image = (const uint8_t *)other;
    bad.start_image_len = other_len;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST, "start_image");
    sketchx_request_init(&bad);
    bad.preprocess = "canny";
    bad.canny_low_threshold = 300;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "canny_low_threshold");
    bad.canny_low_threshold = 10;
    bad.canny_high_threshold = 3000;
    CHECK_ERR(sketchx_pipeline_submit_file(p, &bad, sketch_path, &id), SKETCHX_INVALID_REQUEST,
              "canny_high_threshold");

    /* Five images: text-to-image, img2img from the sketch, from the other image, lineart, canny: all differ. */
    char *png[5] = {NULL, NULL, NULL, NULL, NULL};
    size_t len[5] = {0, 0, 0, 0, 0};
    sketchx_request_init(&req);
    png[0] = img2img_png(p, &req, sketch_path, &len[0]);
    sketchx_request_init(&req);
    req.start_image_from_sketch = 1;
    req.strength = 0.5;
    png[1] = img2img_png(p, &req, sketch_path, &len[1]);
    sketchx_request_init(&req);
    req.start_image = (const uint8_t *)other;
    req.start_image_len = other_len;
    req.strength = 0.5;
    png[2] = img2img_png(p, &req, sketch_path, &len[2]);
    sketchx_request_init(&req);
    req.preprocess = "lineart";
    png[3] = img2img_png(p, &req, sketch_path, &len[3]);
    sketchx_request_init(&req);
    req.preprocess = "Canny";
    req.canny_low_threshold = 50;
    req.canny_high_threshold = 100;
    png[4] = img2img_png(p, &req, sketch_path, &len[4]);
    for (int i = 0; i < 5; i++) {
        for (int j = i + 1; j < 5; j++) {
            if (png[i] != NULL && png[j] != NULL) CHECK(len[i] != len[j] || memcmp(png[i], png[j], len[i]) != 0);
        }
    }
    for (int i = 0; i < 5; i++) free(png[i]);
    free(other);
    sketchx_pipeline_free(p);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s FIXTURES_DIR WORK_DIR\n", argv[0]);
        return 2;
    }
    test_static_functions();
    test_pipeline(argv[1], argv[2]);
    test_vae_tiling(argv[1], argv[2]);
    test_textual_inversion(argv[1], argv[2]);
    test_few_step(argv[1], argv[2]);
    test_img2img_and_preprocess(argv[1], argv[2]);
    test_single_file(argv[1], argv[2]);
    test_redis_client(argv[1], argv[2]);
    printf("api_test: %d checks, %d passed, %d failed\n", checks, checks - failures, failures);
    return failures == 0 ? 0 : 1;
}
