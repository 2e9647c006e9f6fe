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
            "          [--scheduler euler_a|euler|ddim|lcm|tcd] [--preprocess scribble|lineart|canny|none]\n"
            "          [--canny-low-threshold N] [--canny-high-threshold N] [--start-image PATH|sketch]\n"
            "          [--strength X] [--model ID_OR_DIR] [--controlnet ID_OR_DIR] [--out DIR]\n"
            "          [--device cpu|cuda|metal] [--vae-tiling] [--clip-skip N] [--embedding PATH[:TOKEN]]...\n",
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

/* The whole file at `path` (malloc'd, `*len` bytes), or NULL. */
static unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long size;
    if (f == NULL) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (data = malloc(size > 0 ? (size_t)size : 1)) != NULL) {
        *len = fread(data, 1, (size_t)size, f);
        if (*len != (size_t)size) {
            free(data);
            data = NULL;
        }
    }
    fclose(f);
    return data;
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
    const char *start_image = NULL;
    unsigned char *start_bytes = NULL;
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
        else if (strcmp(flag, "--canny-low-threshold") == 0) request.canny_low_threshold = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--canny-high-threshold") == 0) request.canny_high_threshold = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(flag, "--start-image") == 0) start_image = v;
        else if (strcmp(flag, "--strength") == 0) request.strength = strtod(v, NULL);
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

    /* img2img: the sketch's own colours, or an image file's bytes (the library decodes them). */
    if (start_image != NULL && strcmp(start_image, "sketch") == 0) {
        request.start_image_from_sketch = 1;
    } else if (start_image != NULL) {
        start_bytes = read_file(start_image, &request.start_image_len);
        if (start_bytes == NULL) {
            fprintf(stderr, "error: cannot read --start-image %s\n", start_image);
            return 2;
        }
        request.start_image = start_bytes;
    }

    int last_step = -1;
    options.progress_callback = on_progress;
    options.user_data = &last_step; /* outlives the pipeline: freed below, before main returns */
    options.cleanup_interval_secs = 0; /* a one-shot program: keep the files */

    fprintf(stderr, "loading models (sketchx %s) ...\n", sketchx_version());
    sketchx_pipeline *pipeline = NULL;
    if ((r = sketchx_pipeline_new(&options, &pipeline)) != SKETCHX_OK) {
        free(start_bytes);
        return fail("loading the models", r);
    }

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
    free(start_bytes);
    return status_code;
}
