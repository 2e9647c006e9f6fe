/*
 * The C twin of examples/generate.rs: turn a sketch into images with sketchx's C API.
 *
 *   cc generate.c $(pkg-config --cflags --libs sketchx) -o generate
 *   ./generate --sketch car.png --prompt "a red sports car"
 *
 * Runs one job on a pipeline (submit, progress callback, wait) and prints the path of every image it wrote.
 * Models are Hugging Face repo ids or local diffusers directories (default: SD1.5 + scribble ControlNet).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sketchx.h"

/* Most --embedding flags taken. */
#define MAX_EMBEDDINGS 16

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --sketch PATH [--prompt TEXT] [--negative-prompt TEXT] [--temperature X]\n"
            "          [--guidance-scale X] [--num-images N] [--steps N] [--seed N] [--width N] [--height N]\n"
            "          [--scheduler euler_a|euler|ddim|lcm|tcd] [--preprocess scribble|none] [--model ID_OR_DIR]\n"
            "          [--controlnet ID_OR_DIR] [--out DIR] [--device cpu|cuda|metal] [--vae-tiling]\n"
            "          [--clip-skip N] [--embedding PATH[:TOKEN]]...\n",
            argv0);
}

/* Called on the worker thread (and on this thread during submit): print progress to stderr. */
static void on_progress(const sketchx_job_info *info, void *user_data) {
    int *last_step = user_data;
    if (info->state == SKETCHX_STATE_RUNNING && (int)info->step != *last_step) {
        *last_step = (int)info->step;
        fprintf(stderr, "\r%ux%u step %zu/%zu  %5.1f%%", info->width, info->height, info->step,
                info->total_steps, info->progress);
        fflush(stderr);
    }
}

static int fail(const char *what, sketchx_result r) {
    const char *field = sketchx_last_error_field();
    fprintf(stderr, "error: %s: %s (%s%s%s)\n", what, sketchx_last_error_message(), sketchx_result_name(r),
            *field ? ", field " : "", field);
    return 1;
}

int main(int argc, char **argv) {
    sketchx_pipeline_options options;
    sketchx_request request;
    const char *sketch = NULL;
    const char *embeddings[MAX_EMBEDDINGS]; /* borrowed from argv */
    sketchx_result r;

    if ((r = sketchx_pipeline_options_init(&options)) != SKETCHX_OK ||
        (r = sketchx_request_init(&request)) != SKETCHX_OK)
        return fail("init", r);

    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--help") == 0 || strcmp(flag, "-h") == 0) {
            usage(argv[0]);
            return 0;
        }
        if (strcmp(flag, "--version") == 0) {
            printf("generate (sketchx %s)\n", sketchx_version());
            return 0;
        }
        if (strcmp(flag, "--vae-tiling") == 0) { /* the only flag without a value */
            options.vae_tiling = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "error: %s needs a value\n", flag);
            usage(argv[0]);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(flag, "--sketch") == 0) sketch = v;
        else if (strcmp(flag, "--prompt") == 0) request.prompt = v;
        else if (strcmp(flag, "--negative-prompt") == 0) request.negative_prompt = v;
        else if (strcmp(flag, "--temperature") == 0) request.temperature = strtod(v, NULL);
        else if (strcmp(flag, "--guidance-scale") == 0) request.guidance_scale = strtod(v, NULL);
        else if (strcmp(flag, "--num-images") == 0) request.num_images = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--steps") == 0) request.steps = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--seed") == 0) {
            request.has_seed = 1;
            request.seed = strtoull(v, NULL, 10);
        }
        else if (strcmp(flag, "--width") == 0) request.width = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--height") == 0) request.height = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--scheduler") == 0) request.scheduler = v;
        else if (strcmp(flag, "--preprocess") == 0) request.preprocess = v;
        else if (strcmp(flag, "--model") == 0) options.model = v;
        else if (strcmp(flag, "--controlnet") == 0) options.controlnet = v;
        else if (strcmp(flag, "--out") == 0) options.output_dir = v;
        else if (strcmp(flag, "--device") == 0) options.device = v;
        else if (strcmp(flag, "--clip-skip") == 0) request.clip_skip = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--embedding") == 0) {
            if (options.embedding_count == MAX_EMBEDDINGS) {
                fprintf(stderr, "error: at most %d --embedding flags\n", MAX_EMBEDDINGS);
                return 2;
            }
            embeddings[options.embedding_count++] = v;
            options.embeddings = embeddings;
        }
        else {
            fprintf(stderr, "error: unknown flag %s\n", flag);
            usage(argv[0]);
            return 2;
        }
    }
    if (sketch == NULL) {
        fprintf(stderr, "error: --sketch is required\n");
        usage(argv[0]);
        return 2;
    }

    int last_step = -1;
    options.progress_callback = on_progress;
    options.user_data = &last_step; /* outlives the pipeline: freed below, before main returns */
    options.cleanup_interval_secs = 0; /* a one-shot program: keep the files */

    fprintf(stderr, "loading models (sketchx %s) ...\n", sketchx_version());
    sketchx_pipeline *pipeline = NULL;
    if ((r = sketchx_pipeline_new(&options, &pipeline)) != SKETCHX_OK)
        return fail("loading the models", r);

    int status_code = 1;
    sketchx_job_id id;
    sketchx_status *status = NULL;
    if ((r = sketchx_pipeline_submit_file(pipeline, &request, sketch, &id)) != SKETCHX_OK) {
        fail("submitting the job", r);
    } else if ((r = sketchx_pipeline_wait(pipeline, id.id, -1, &status)) != SKETCHX_OK) {
        fail("waiting for the job", r);
    } else {
        sketchx_job_info info;
        sketchx_status_info(status, &info);
        fputc('\n', stderr);
        if (info.state == SKETCHX_STATE_COMPLETED) {
            fprintf(stderr, "generated %zu image(s) of %ux%u (seed %llu, job %s)\n", info.image_count,
                    info.width, info.height, (unsigned long long)info.seed, id.id);
            for (size_t i = 0; i < sketchx_status_image_count(status); i++)
                printf("%s\n", sketchx_status_image_path(status, i));
            status_code = 0;
        } else {
            fprintf(stderr, "error: job %s: %s\n", id.id, sketchx_status_message(status));
        }
    }
    sketchx_status_free(status);
    sketchx_pipeline_free(pipeline);
    return status_code;
}
