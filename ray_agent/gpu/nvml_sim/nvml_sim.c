/*
 * Simulated libnvidia-ml.so.1: NVML's C interface answering from a compiled rayrack GPU scenario.
 *
 * The configuration is written by `ray-agent nvml-sim compile` (format: compiler.py) and read at the first
 * nvmlInit from $RAYRACK_NVML_SCENARIO, else SCENARIO_DEFAULT, the path `make nvml-sim` builds in (the nvml_sim
 * role's, under rayrack_config_dir; NVML_SIM_CONFIG in the Makefile). Scenario time is wall-clock time
 * since the file's epoch (its mtime unless it names one), so every process on a node sees the same GPUs at
 * the same moment. Values follow ray_agent/gpu/fake.py: traces, faults, delays, processes, XIDs, ECC.
 * Entry points the simulator does not model return NVML_ERROR_NOT_SUPPORTED (nvml_sim_unsupported.h).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <stddef.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define API __attribute__((visibility("default")))

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define SCENARIO_ENV "RAYRACK_NVML_SCENARIO"
#ifndef SCENARIO_DEFAULT
#error "SCENARIO_DEFAULT (the scenario's path on the node) comes from make nvml-sim"
#endif
#define FORMAT_LINE "rayrack-nvml-sim 1"
#define NVML_VERSION_PREFIX "12."
#define CUDA_DRIVER_VERSION 12040
#define EVENT_XID 0x8ULL
#define ALL_LINKS 0xFFFFFFFFu
#define FI_NVLINK_TX 138u
#define FI_NVLINK_RX 139u
#define FI_MEMORY_TEMP 82u
#define FI_NVLINK_SPEED_L0 84u   /* L0..L5: 84..89 */
#define FI_NVLINK_SPEED_L6 132u  /* L6..L11: 132..137 */
#define FI_NVLINK_SPEED_COMMON 90u
#define FI_NVLINK_GET_SPEED 164u /* any link: the link is the value's scopeId */
#define NVLINK_SPEED_FIELD_LINKS 12u
#define MAX_NVLINKS 18
#define VALUE_TYPE_UINT 1
#define ENCODER_SAMPLING_US 167000u
#define FABRIC_V2_VERSION 0x02000024u
#define FABRIC_V3_VERSION 0x03000028u
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define VALUE_TYPE_ULL 3
#define TOPOLOGY_INTERNAL 0
#define TOPOLOGY_MULTIPLE 20
#define TOPOLOGY_NODE 40
#define TOPOLOGY_SYSTEM 50
#define NVLINK_DEVICE_TYPE_SWITCH 2
/* A hung call re-checks its window (and shutdown) at least this often. */
#define HANG_POLL_SECONDS 0.5
#define EVENT_POLL_SECONDS 0.05

/* --- scenario model ----------------------------------------------------------------------------- */

enum call {
    CALL_INIT,
    CALL_SHUTDOWN,
    CALL_DEVICE,
    CALL_MEMORY,
    CALL_UTILIZATION,
    CALL_POWER,
    CALL_TEMPERATURE,
    CALL_SM_CLOCK,
    CALL_MEMORY_CLOCK,
    CALL_ECC,
    CALL_XID,
    CALL_PCIE,
    CALL_NVLINK,
    CALL_PROCESSES,
    CALL_GPM,
    /* health fields */
    CALL_FAN_SPEED,
    CALL_MEMORY_TEMPERATURE,
    CALL_ENERGY,
    CALL_PCIE_REPLAY,
    CALL_ENCODER_UTILIZATION,
    CALL_DECODER_UTILIZATION,
    CALL_MEMORY_RESERVED,
    CALL_REMAPPED_ROWS,
    CALL_RETIRED_PAGES,
    CALL_CLOCK_EVENTS,
    CALL_ANY,
    CALL_COUNT,
};
static const char *const CALL_NAMES[CALL_COUNT] = {
    "init", "shutdown", "device", "memory", "utilization", "power", "temperature", "sm_clock",
    "memory_clock", "ecc", "xid", "pcie", "nvlink", "processes", "gpm",
    /* health fields */
    "fan_speed", "memory_temperature", "energy", "pcie_replay", "encoder_utilization", "decoder_utilization",
    "memory_reserved", "remapped_rows", "retired_pages", "clock_events",
    "any",
};

struct segment {
    double duration, start, end;
};

struct trace {
    int count;
    struct segment *segments;
};

struct window {
    double start, end, every; /* end, every < 0: none */
};

struct fault {
    int gpu; /* -1: every GPU */
    int call;
    int error; /* -1: hang */
    struct window window;
};

struct process {
    unsigned int pid;
    unsigned long long memory;
    struct window window;
};

struct xid {
    double at;
    unsigned long long code;
};

enum trace_id {
    T_UTILIZATION,
    T_MEMORY_UTILIZATION,
    T_POWER,
    T_TEMPERATURE,
    T_SM_CLOCK,
    T_MEMORY_CLOCK,
    T_PCIE_TX,
    T_PCIE_RX,
    T_NVLINK_TX,
    T_NVLINK_RX,
    T_GRAPHICS_ACTIVE,
    T_SM_ACTIVE,
    T_SM_OCCUPANCY,
    T_TENSOR_ACTIVE,
    T_DRAM_ACTIVE,
    /* health fields */
    T_FAN_SPEED,
    T_MEMORY_TEMPERATURE,
    T_PCIE_REPLAY,
    T_ENCODER,
    T_DECODER,
    T_MEMORY_USED,
    T_COUNT,
};
static const char *const TRACE_NAMES[T_COUNT] = {
    "utilization", "memory_utilization", "power_watts", "temperature_celsius", "sm_clock_mhz",
    "memory_clock_mhz", "pcie_tx", "pcie_rx", "nvlink_tx", "nvlink_rx", "graphics_active", "sm_active",
    "sm_occupancy", "tensor_active", "dram_active",
    /* health fields */
    "fan_speed", "memory_temperature_celsius", "pcie_replay_errors_per_second", "encoder_utilization",
    "decoder_utilization", "memory_used",
};

struct gpu {
    unsigned int index;
    char *model, *uuid, *pci;
    unsigned int pci_domain, pci_bus, pci_device;
    unsigned long long memory_total;
    struct trace traces[T_COUNT]; /* memory_used has count 0 when memory follows the processes */
    unsigned long long ecc[4];    /* corrected/uncorrected volatile, corrected/uncorrected aggregate */
    struct xid *xids;
    int xid_count;
    struct process *processes;
    int process_count;
    int discover;
    unsigned long long process_memory;
    double delay; /* < 0: the scenario's */
    unsigned int nvlink_links;
    int gpm; /* answers the GPM calls (Hopper and later) */
    /* health fields */
    unsigned long long memory_reserved;
    unsigned int remapped[4]; /* correctable, uncorrectable, pending, failed */
    unsigned int retired_pages_pending;
    unsigned int ecc_disabled; /* zero (a file without an ecc_mode line): enabled */
    unsigned long long clock_event_reasons;
    /* topology */
    unsigned int pcie_link[5]; /* generation, width, max generation, max width, GPU max generation */
    unsigned int nvlink_speed[MAX_NVLINKS]; /* MB/s; 0 for a link that is down */
    unsigned int nvlink_down[MAX_NVLINKS];
    int has_fabric;
    unsigned int fabric_state;
    int fabric_status;
};

struct scenario {
    double epoch;
    char *driver_version;
    double delay;
    struct gpu *gpus;
    unsigned int gpu_count;
    struct fault *faults;
    int fault_count;
    struct scenario *retired; /* replaced by a reload; freed when the library unloads */
};

struct event_set {
    int count;
    struct gpu *gpus[64];
    int delivered[64];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t shutdown_cond = PTHREAD_COND_INITIALIZER;
static struct scenario *current;
static int refcount;
static unsigned long generation; /* bumped by every shutdown to 0, so hung calls return */

/* --- helpers -------------------------------------------------------------------------------------- */

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double scenario_time(const struct scenario *s)
{
    return now_seconds() - s->epoch;
}

static void sleep_seconds(double seconds)
{
    if (seconds <= 0)
        return;
    struct timespec ts = {(time_t)seconds, (long)((seconds - floor(seconds)) * 1e9)};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static double segment_value(const struct segment *s, double offset)
{
    return s->start + (s->end - s->start) * (offset / s->duration);
}

static double segment_area(const struct segment *s, double offset)
{
    return (s->start + segment_value(s, offset)) / 2.0 * offset;
}

static double trace_period(const struct trace *t)
{
    double period = 0;
    for (int i = 0; i < t->count; i++)
        period += t->segments[i].duration;
    return period;
}

/* Same arithmetic as fake.Trace.value_at. */
static double trace_value(const struct trace *t, double at)
{
    double offset = at >= 0 ? fmod(at, trace_period(t)) : 0.0;
    for (int i = 0; i < t->count; i++) {
        if (offset < t->segments[i].duration)
            return segment_value(&t->segments[i], offset);
        offset -= t->segments[i].duration;
    }
    return t->segments[t->count - 1].end;
}

/* Same arithmetic as fake.Trace.integral (Python's divmod for floats). */
static double trace_integral(const struct trace *t, double at)
{
    if (at <= 0)
        return 0.0;
    double period = trace_period(t);
    double offset = fmod(at, period);
    double whole = (at - offset) / period;
    double floor_whole = floor(whole);
    if (whole - floor_whole > 0.5)
        floor_whole += 1.0;
    double per_period = 0;
    for (int i = 0; i < t->count; i++)
        per_period += segment_area(&t->segments[i], t->segments[i].duration);
    double total = floor_whole * per_period;
    for (int i = 0; i < t->count; i++) {
        if (offset < t->segments[i].duration)
            return total + segment_area(&t->segments[i], offset);
        total += segment_area(&t->segments[i], t->segments[i].duration);
        offset -= t->segments[i].duration;
    }
    return total;
}

static int window_active(const struct window *w, double t)
{
    if (t < w->start)
        return 0;
    if (w->every >= 0)
        t = w->start + fmod(t - w->start, w->every);
    return w->end < 0 || t < w->end;
}

static double window_remaining(const struct window *w, double t)
{
    if (w->end < 0)
        return HANG_POLL_SECONDS;
    if (w->every >= 0)
        t = w->start + fmod(t - w->start, w->every);
    return w->end - t;
}

static unsigned long long round_unsigned(double value)
{
    return value <= 0 ? 0ULL : (unsigned long long)llround(value);
}

static void copy_text(char *out, unsigned int length, const char *text)
{
    if (length == 0)
        return;
    snprintf(out, length, "%s", text);
}

/* NVML's string getters: a null buffer is an invalid argument, a short one INSUFFICIENT_SIZE (nothing written). */
static nvmlReturn_t put_text(char *out, unsigned int length, const char *text)
{
    if (!out)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    copy_text(out, length, text);
    return NVML_SUCCESS;
}

/* --- loading the compiled scenario -------------------------------------------------------------- */

static void free_scenario(struct scenario *s)
{
    while (s) {
        struct scenario *next = s->retired;
        for (unsigned int i = 0; i < s->gpu_count; i++) {
            struct gpu *g = &s->gpus[i];
            free(g->model);
            free(g->uuid);
            free(g->pci);
            for (int t = 0; t < T_COUNT; t++)
                free(g->traces[t].segments);
            free(g->xids);
            free(g->processes);
        }
        free(s->gpus);
        free(s->faults);
        free(s->driver_version);
        free(s);
        s = next;
    }
}

struct reader {
    const char *path;
    int line;
    char *save;
    int failed;
};

static void parse_error(struct reader *r, const char *what)
{
    if (!r->failed)
        fprintf(stderr, "nvml-sim: %s:%d: %s\n", r->path, r->line, what);
    r->failed = 1;
}

static char *next_token(struct reader *r)
{
    char *token = strtok_r(NULL, " \t\n", &r->save);
    if (!token)
        parse_error(r, "missing value");
    return token;
}

static double next_double(struct reader *r)
{
    char *token = next_token(r), *end;
    if (!token)
        return 0;
    double value = strtod(token, &end);
    if (*end)
        parse_error(r, "expected a number");
    return value;
}

static long long next_int(struct reader *r)
{
    char *token = next_token(r), *end;
    if (!token)
        return 0;
    long long value = strtoll(token, &end, 10);
    if (*end)
        parse_error(r, "expected an integer");
    return value;
}

static char *rest_of_line(struct reader *r)
{
    char *rest = r->save;
    while (rest && (*rest == ' ' || *rest == '\t'))
        rest++;
    if (!rest || !*rest) {
        parse_error(r, "missing text");
        return strdup("");
    }
    rest[strcspn(rest, "\n")] = '\0';
    return strdup(rest);
}

static void read_window(struct reader *r, struct window *w)
{
    w->start = next_double(r);
    w->end = next_double(r);
    w->every = next_double(r);
}

static int call_id(const char *name)
{
    for (int i = 0; i < CALL_COUNT; i++)
        if (strcmp(name, CALL_NAMES[i]) == 0)
            return i;
    return -1;
}

static void parse_pci(struct gpu *g)
{
    unsigned int domain = 0, bus = 0, device = 0, function = 0;
    if (sscanf(g->pci, "%x:%x:%x.%x", &domain, &bus, &device, &function) == 4) {
        g->pci_domain = domain;
        g->pci_bus = bus;
        g->pci_device = device;
    }
}

static struct scenario *load_scenario(const char *path, nvmlReturn_t *error)
{
    FILE *file = fopen(path, "r");
    if (!file) {
        fprintf(stderr, "nvml-sim: cannot read %s: %s\n", path, strerror(errno));
        *error = NVML_ERROR_DRIVER_NOT_LOADED;
        return NULL;
    }
    struct stat st;
    struct scenario *s = calloc(1, sizeof(*s));
    s->epoch = -1;
    if (fstat(fileno(file), &st) == 0)
        s->epoch = (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec / 1e9;
    struct reader r = {.path = path};
    struct gpu *g = NULL;
    int faults_capacity = 0, seen_end = 0;
    char *line = NULL;
    size_t capacity = 0;
    while (!r.failed && !seen_end && getline(&line, &capacity, file) != -1) {
        r.line++;
        if (r.line == 1) {
            if (strncmp(line, FORMAT_LINE, strlen(FORMAT_LINE)) != 0)
                parse_error(&r, "not a compiled scenario (expected '" FORMAT_LINE "'; use ray-agent nvml-sim compile)");
            continue;
        }
        char *key = strtok_r(line, " \t\n", &r.save);
        if (!key)
            continue;
        if (strcmp(key, "epoch") == 0) {
            s->epoch = next_double(&r);
        } else if (strcmp(key, "driver_version") == 0) {
            free(s->driver_version);
            s->driver_version = rest_of_line(&r);
        } else if (strcmp(key, "delay") == 0) {
            s->delay = next_double(&r);
        } else if (strcmp(key, "gpus") == 0) {
            long long count = next_int(&r);
            if (count < 0 || count > 1024 || s->gpus) {
                parse_error(&r, "bad GPU count");
                break;
            }
            s->gpu_count = (unsigned int)count;
            s->gpus = calloc(count ? (size_t)count : 1, sizeof(struct gpu));
        } else if (strcmp(key, "gpu") == 0) {
            long long index = next_int(&r);
            if (!s->gpus || index < 0 || index >= (long long)s->gpu_count) {
                parse_error(&r, "GPU index out of range");
                break;
            }
            g = &s->gpus[index];
            g->index = (unsigned int)index;
            g->delay = -1;
        } else if (strcmp(key, "end_gpus") == 0) {
            g = NULL;
        } else if (strcmp(key, "fault") == 0) {
            if (s->fault_count == faults_capacity) {
                faults_capacity = faults_capacity ? faults_capacity * 2 : 8;
                s->faults = realloc(s->faults, (size_t)faults_capacity * sizeof(struct fault));
            }
            struct fault *f = &s->faults[s->fault_count];
            f->gpu = (int)next_int(&r);
            char *call = next_token(&r);
            f->call = call ? call_id(call) : -1;
            if (f->call < 0)
                parse_error(&r, "unknown call");
            f->error = (int)next_int(&r);
            read_window(&r, &f->window);
            if (f->gpu >= (int)s->gpu_count)
                parse_error(&r, "fault names a GPU the scenario does not have");
            s->fault_count++;
        } else if (strcmp(key, "end") == 0) {
            seen_end = 1;
        } else if (!g) {
            parse_error(&r, "unknown key");
        } else if (strcmp(key, "model") == 0) {
            free(g->model);
            g->model = rest_of_line(&r);
        } else if (strcmp(key, "uuid") == 0) {
            free(g->uuid);
            g->uuid = rest_of_line(&r);
        } else if (strcmp(key, "pci") == 0) {
            free(g->pci);
            g->pci = rest_of_line(&r);
            parse_pci(g);
        } else if (strcmp(key, "memory_total") == 0) {
            g->memory_total = (unsigned long long)next_int(&r);
        } else if (strcmp(key, "trace") == 0) {
            char *name = next_token(&r);
            int id = -1;
            for (int i = 0; name && i < T_COUNT; i++)
                if (strcmp(name, TRACE_NAMES[i]) == 0)
                    id = i;
            long long count = next_int(&r);
            if (id < 0 || count < 1 || count > 100000 || g->traces[id].count) {
                parse_error(&r, "bad trace");
                break;
            }
            struct trace *t = &g->traces[id];
            t->segments = calloc((size_t)count, sizeof(struct segment));
            t->count = (int)count;
            for (int i = 0; i < t->count; i++) {
                t->segments[i].duration = next_double(&r);
                t->segments[i].start = next_double(&r);
                t->segments[i].end = next_double(&r);
                if (t->segments[i].duration <= 0)
                    parse_error(&r, "a segment must last longer than 0s");
            }
        } else if (strcmp(key, "ecc") == 0) {
            for (int i = 0; i < 4; i++)
                g->ecc[i] = (unsigned long long)next_int(&r);
        } else if (strcmp(key, "xid") == 0) {
            g->xids = realloc(g->xids, (size_t)(g->xid_count + 1) * sizeof(struct xid));
            g->xids[g->xid_count].at = next_double(&r);
            g->xids[g->xid_count].code = (unsigned long long)next_int(&r);
            g->xid_count++;
        } else if (strcmp(key, "process") == 0) {
            g->processes = realloc(g->processes, (size_t)(g->process_count + 1) * sizeof(struct process));
            struct process *p = &g->processes[g->process_count++];
            p->pid = (unsigned int)next_int(&r);
            p->memory = (unsigned long long)next_int(&r);
            read_window(&r, &p->window);
        } else if (strcmp(key, "discover") == 0) {
            g->discover = 1;
            g->process_memory = (unsigned long long)next_int(&r);
        } else if (strcmp(key, "gpu_delay") == 0) {
            g->delay = next_double(&r);
        } else if (strcmp(key, "nvlink_links") == 0) {
            long long links = next_int(&r);
            long long speed = next_int(&r);
            if (links < 0 || links > MAX_NVLINKS || speed < 0) {
                parse_error(&r, "bad NVLink link count or speed");
                break;
            }
            g->nvlink_links = (unsigned int)links;
            for (int i = 0; i < MAX_NVLINKS; i++)
                g->nvlink_speed[i] = (unsigned int)speed;
        } else if (strcmp(key, "nvlink_speed") == 0 || strcmp(key, "nvlink_down") == 0) {
            int down = key[7] == 'd';
            long long link = next_int(&r);
            long long speed = down ? 0 : next_int(&r);
            if (link < 0 || link >= (long long)g->nvlink_links || speed < 0) {
                parse_error(&r, "NVLink link out of range (nvlink_links must come first)");
                break;
            }
            if (down)
                g->nvlink_down[link] = 1;
            else
                g->nvlink_speed[link] = (unsigned int)speed;
        } else if (strcmp(key, "gpm") == 0) {
            g->gpm = next_int(&r) != 0;
        } else if (strcmp(key, "memory_reserved") == 0) {
            g->memory_reserved = (unsigned long long)next_int(&r);
        } else if (strcmp(key, "remapped_rows") == 0) {
            for (int i = 0; i < 4; i++)
                g->remapped[i] = (unsigned int)next_int(&r);
        } else if (strcmp(key, "retired_pages_pending") == 0) {
            g->retired_pages_pending = (unsigned int)next_int(&r);
        } else if (strcmp(key, "ecc_mode") == 0) {
            g->ecc_disabled = next_int(&r) == 0;
        } else if (strcmp(key, "clock_event_reasons") == 0) {
            g->clock_event_reasons = (unsigned long long)next_int(&r);
        } else if (strcmp(key, "pcie_link") == 0) {
            for (int i = 0; i < 5; i++)
                g->pcie_link[i] = (unsigned int)next_int(&r);
        } else if (strcmp(key, "fabric") == 0) {
            g->has_fabric = 1;
            g->fabric_state = (unsigned int)next_int(&r);
            g->fabric_status = (int)next_int(&r);
        } else {
            parse_error(&r, "unknown key");
        }
    }
    free(line);
    fclose(file);
    if (!r.failed && !seen_end)
        parse_error(&r, "truncated (no 'end' line)");
    for (unsigned int i = 0; !r.failed && i < s->gpu_count; i++) {
        struct gpu *gpu = &s->gpus[i];
        if (!gpu->model || !gpu->uuid || !gpu->pci)
            parse_error(&r, "a GPU lacks model, uuid or pci");
        for (int t = 0; !r.failed && t < T_MEMORY_USED; t++)
            if (!gpu->traces[t].count)
                parse_error(&r, "a GPU lacks a trace");
    }
    if (!r.failed && !s->driver_version)
        parse_error(&r, "no driver_version");
    if (r.failed) {
        free_scenario(s);
        *error = NVML_ERROR_UNKNOWN;
        return NULL;
    }
    return s;
}

__attribute__((destructor)) static void unload(void)
{
    free_scenario(current);
    current = NULL;
}

/* --- calls ---------------------------------------------------------------------------------------- */

/* The scenario of an initialised library, or NULL (and the caller returns UNINITIALIZED). */
static struct scenario *active(unsigned long *gen)
{
    pthread_mutex_lock(&lock);
    struct scenario *s = refcount > 0 ? current : NULL;
    if (gen)
        *gen = generation;
    pthread_mutex_unlock(&lock);
    return s;
}

/* Blocks like a hung driver call until the fault's window ends or the library is shut down. */
static nvmlReturn_t hang(struct scenario *s, const struct fault *f, unsigned long gen)
{
    double t;
    while (window_active(&f->window, t = scenario_time(s))) {
        double wait = window_remaining(&f->window, t);
        wait = wait < 0.01 ? 0.01 : (wait > HANG_POLL_SECONDS ? HANG_POLL_SECONDS : wait);
        double deadline = now_seconds() + wait;
        struct timespec ts = {(time_t)deadline, (long)((deadline - floor(deadline)) * 1e9)};
        pthread_mutex_lock(&lock);
        if (generation != gen) {
            pthread_mutex_unlock(&lock);
            return NVML_ERROR_UNINITIALIZED;
        }
        pthread_cond_timedwait(&shutdown_cond, &lock, &ts);
        int shut = generation != gen;
        pthread_mutex_unlock(&lock);
        if (shut)
            return NVML_ERROR_UNINITIALIZED;
    }
    return NVML_SUCCESS;
}

/* The per-call delay and the first active fault for this call, as fake.FakeBackend._call. */
static nvmlReturn_t enter(struct scenario *s, int call, int gpu, unsigned long gen)
{
    double delay = s->delay;
    if (gpu >= 0 && s->gpus[gpu].delay >= 0)
        delay = s->gpus[gpu].delay;
    sleep_seconds(delay);
    for (int i = 0; i < s->fault_count; i++) {
        const struct fault *f = &s->faults[i];
        if (f->gpu >= 0 && f->gpu != gpu)
            continue;
        if (f->call != CALL_ANY && f->call != call)
            continue;
        if (!window_active(&f->window, scenario_time(s)))
            continue;
        if (f->error >= 0)
            return f->error;
        nvmlReturn_t ret = hang(s, f, gen);
        if (ret != NVML_SUCCESS)
            return ret;
    }
    return NVML_SUCCESS;
}

static struct gpu *gpu_of(struct scenario *s, const void *handle)
{
    const struct gpu *g = handle;
    if (!g || g < s->gpus || g >= s->gpus + s->gpu_count)
        return NULL;
    return (struct gpu *)g;
}

/* Opens a device call: initialised, a valid handle, then delay and faults. */
#define DEVICE_CALL(call_kind, handle, out_gpu)                                                          \
    unsigned long gen_;                                                                                  \
    struct scenario *s = active(&gen_);                                                                  \
    if (!s)                                                                                              \
        return NVML_ERROR_UNINITIALIZED;                                                                 \
    struct gpu *out_gpu = gpu_of(s, handle);                                                             \
    if (!out_gpu)                                                                                        \
        return NVML_ERROR_INVALID_ARGUMENT;                                                              \
    do {                                                                                                 \
        nvmlReturn_t ret_ = enter(s, call_kind, (int)out_gpu->index, gen_);                              \
        if (ret_ != NVML_SUCCESS)                                                                        \
            return ret_;                                                                                 \
    } while (0)

#define SYSTEM_CALL()                                                                                    \
    unsigned long gen_;                                                                                  \
    struct scenario *s = active(&gen_);                                                                  \
    if (!s)                                                                                              \
        return NVML_ERROR_UNINITIALIZED;                                                                 \
    sleep_seconds(s->delay)

/* --- processes -------------------------------------------------------------------------------------- */

/* CUDA_VISIBLE_DEVICES from a process's start-up environment; 0 when absent or unreadable. */
static int visible_devices(const char *pid, char *out, size_t size)
{
    char path[300];
    snprintf(path, sizeof(path), "/proc/%s/environ", pid);
    FILE *file = fopen(path, "r");
    if (!file)
        return 0;
    static const char key[] = "CUDA_VISIBLE_DEVICES=";
    char *entry = NULL;
    size_t capacity = 0;
    int found = 0;
    while (!found && getdelim(&entry, &capacity, '\0', file) != -1) {
        if (strncmp(entry, key, sizeof(key) - 1) == 0) {
            snprintf(out, size, "%s", entry + sizeof(key) - 1);
            found = 1;
        }
    }
    free(entry);
    fclose(file);
    return found;
}

static int parent_of(const char *pid, char *out, size_t size)
{
    char path[300], buffer[1024];
    snprintf(path, sizeof(path), "/proc/%s/stat", pid);
    FILE *file = fopen(path, "r");
    if (!file)
        return 0;
    size_t n = fread(buffer, 1, sizeof(buffer) - 1, file);
    fclose(file);
    buffer[n] = '\0';
    char *close = strrchr(buffer, ')');
    char state;
    int ppid;
    if (!close || sscanf(close + 1, " %c %d", &state, &ppid) != 2)
        return 0;
    snprintf(out, size, "%d", ppid);
    return 1;
}

static int lists_gpu(const char *value, const struct gpu *g)
{
    char copy[4096], index[16], *save = NULL;
    snprintf(copy, sizeof(copy), "%s", value);
    snprintf(index, sizeof(index), "%u", g->index);
    for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        while (isspace((unsigned char)*item))
            item++;
        char *end = item + strlen(item);
        while (end > item && isspace((unsigned char)end[-1]))
            *--end = '\0';
        if (strcmp(item, index) == 0 || strcmp(item, g->uuid) == 0)
            return 1;
    }
    return 0;
}

static int compare_pids(const void *a, const void *b)
{
    unsigned int x = *(const unsigned int *)a, y = *(const unsigned int *)b;
    return (x > y) - (x < y);
}

/* Pids that were given this GPU at start-up (not inherited from a parent with the same value), sorted. */
static unsigned int assigned_pids(const struct gpu *g, unsigned int **pids)
{
    *pids = NULL;
    DIR *proc = opendir("/proc");
    if (!proc)
        return 0;
    unsigned int count = 0, capacity = 0;
    struct dirent *entry;
    char value[4096], parent[32], parent_value[4096];
    while ((entry = readdir(proc))) {
        if (!isdigit((unsigned char)entry->d_name[0]))
            continue;
        if (!visible_devices(entry->d_name, value, sizeof(value)) || !lists_gpu(value, g))
            continue;
        if (parent_of(entry->d_name, parent, sizeof(parent)) &&
            visible_devices(parent, parent_value, sizeof(parent_value)) && strcmp(parent_value, value) == 0)
            continue;
        if (count == capacity) {
            capacity = capacity ? capacity * 2 : 16;
            *pids = realloc(*pids, capacity * sizeof(unsigned int));
        }
        (*pids)[count++] = (unsigned int)strtoul(entry->d_name, NULL, 10);
    }
    closedir(proc);
    if (count)
        qsort(*pids, count, sizeof(unsigned int), compare_pids);
    return count;
}

struct running {
    unsigned int count;
    unsigned int *pids;
    unsigned long long *memory;
};

static void running_processes(const struct scenario *s, const struct gpu *g, struct running *out)
{
    out->count = 0;
    out->pids = NULL;
    out->memory = NULL;
    if (g->discover) {
        out->count = assigned_pids(g, &out->pids);
        out->memory = calloc(out->count ? out->count : 1, sizeof(unsigned long long));
        for (unsigned int i = 0; i < out->count; i++)
            out->memory[i] = g->process_memory;
        return;
    }
    double t = scenario_time(s);
    out->pids = calloc(g->process_count ? (size_t)g->process_count : 1, sizeof(unsigned int));
    out->memory = calloc(g->process_count ? (size_t)g->process_count : 1, sizeof(unsigned long long));
    for (int i = 0; i < g->process_count; i++) {
        if (!window_active(&g->processes[i].window, t))
            continue;
        out->pids[out->count] = g->processes[i].pid;
        out->memory[out->count] = g->processes[i].memory;
        out->count++;
    }
}

static void free_running(struct running *r)
{
    free(r->pids);
    free(r->memory);
}

/* ======================================================================================================
 * Exported NVML entry points
 * ====================================================================================================== */

API const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case 0: return "Success";
    case 1: return "Uninitialized";
    case 2: return "Invalid Argument";
    case 3: return "Not Supported";
    case 4: return "Insufficient Permissions";
    case 5: return "Already Initialized";
    case 6: return "Not Found";
    case 7: return "Insufficient Size";
    case 8: return "Insufficient External Power";
    case 9: return "Driver Not Loaded";
    case 10: return "Timeout";
    case 11: return "Interrupt Request Issue";
    case 12: return "NVML Shared Library Not Found";
    case 13: return "Function Not Found";
    case 14: return "Corrupted infoROM";
    case 15: return "GPU is lost";
    case 16: return "GPU requires restart";
    case 17: return "The operating system has blocked the request.";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    case 19: return "In use by another client";
    case 20: return "Insufficient Memory";
    case 21: return "No data";
    case 22: return "The requested vgpu operation is not available on target device, because ECC is enabled";
    case 23: return "Ran out of critical resources, other than memory";
    case 24: return "Ran out of critical resources, other than memory";
    case 25: return "Version mismatch";
    case 26: return "Deprecated";
    case 27: return "Not Ready";
    case 28: return "GPU not found";
    case 29: return "Invalid state";
    case 30: return "Reset type not supported";
    default: return "Unknown Error";
    }
}

API nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&lock);
    if (refcount == 0) {
        const char *path = getenv(SCENARIO_ENV);
        path = path && *path ? path : SCENARIO_DEFAULT;
        nvmlReturn_t error = NVML_SUCCESS;
        struct scenario *loaded = load_scenario(path, &error);
        if (!loaded) {
            pthread_mutex_unlock(&lock);
            return error;
        }
        /* Calls still hung in the old scenario may read it until they notice the shutdown. */
        loaded->retired = current;
        current = loaded;
    }
    struct scenario *s = current;
    unsigned long gen = generation;
    pthread_mutex_unlock(&lock);
    nvmlReturn_t ret = enter(s, CALL_INIT, -1, gen);
    if (ret != NVML_SUCCESS)
        return ret;
    pthread_mutex_lock(&lock);
    refcount++;
    pthread_mutex_unlock(&lock);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

API nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

API nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&lock);
    if (refcount == 0) {
        pthread_mutex_unlock(&lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    struct scenario *s = current;
    if (--refcount == 0) {
        generation++;
        pthread_cond_broadcast(&shutdown_cond);
    }
    unsigned long gen = generation;
    pthread_mutex_unlock(&lock);
    /* Like the fake, the library is shut down even when the scenario makes shutdown report an error. */
    return enter(s, CALL_SHUTDOWN, -1, gen);
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    SYSTEM_CALL();
    return put_text(version, length, s->driver_version);
}

API nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    SYSTEM_CALL();
    char text[96];
    snprintf(text, sizeof(text), NVML_VERSION_PREFIX "%s", s->driver_version);
    return put_text(version, length, text);
}

API nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version)
{
    SYSTEM_CALL();
    if (!version)
        return NVML_ERROR_INVALID_ARGUMENT;
    *version = CUDA_DRIVER_VERSION;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

API nvmlReturn_t nvmlSystemGetProcessName(unsigned int pid, char *name, unsigned int length)
{
    SYSTEM_CALL();
    if (!name || !length)
        return NVML_ERROR_INVALID_ARGUMENT;
    char path[64];
    snprintf(path, sizeof(path), "/proc/%u/cmdline", pid);
    FILE *file = fopen(path, "r");
    if (!file)
        return NVML_ERROR_NOT_FOUND;
    size_t n = fread(name, 1, length - 1, file);
    fclose(file);
    name[n] = '\0';
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    SYSTEM_CALL();
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = s->gpu_count;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device)
{
    unsigned long gen;
    struct scenario *s = active(&gen);
    if (!s)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= s->gpu_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    nvmlReturn_t ret = enter(s, CALL_DEVICE, (int)index, gen);
    if (ret != NVML_SUCCESS)
        return ret;
    *device = &s->gpus[index];
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, void **device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

static nvmlReturn_t handle_by(const char *text, int by_uuid, void **device)
{
    unsigned long gen;
    struct scenario *s = active(&gen);
    if (!s)
        return NVML_ERROR_UNINITIALIZED;
    if (!text || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < s->gpu_count; i++) {
        const char *have = by_uuid ? s->gpus[i].uuid : s->gpus[i].pci;
        if (strcasecmp(have, text) == 0 || (!by_uuid && strlen(text) < strlen(have) && strcasecmp(have + strlen(have) - strlen(text), text) == 0)) {
            nvmlReturn_t ret = enter(s, CALL_DEVICE, (int)i, gen);
            if (ret != NVML_SUCCESS)
                return ret;
            *device = &s->gpus[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **device) { return handle_by(uuid, 1, device); }

API nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *pci, void **device)
{
    return handle_by(pci, 0, device);
}

API nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *pci, void **device) { return handle_by(pci, 0, device); }

API nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned int *index)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!index)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = g->index;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetMinorNumber(void *device, unsigned int *minor)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!minor)
        return NVML_ERROR_INVALID_ARGUMENT;
    *minor = g->index;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned int length)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    return put_text(name, length, g->model);
}

API nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    return put_text(uuid, length, g->uuid);
}

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

static void fill_pci(const struct gpu *g, nvmlPciInfo_t *pci)
{
    memset(pci, 0, sizeof(*pci));
    /* The legacy field holds the short form: 4-digit domain. */
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "%04X:%02X:%02X.0", g->pci_domain & 0xFFFF,
             g->pci_bus & 0xFF, g->pci_device & 0xFF);
    copy_text(pci->busId, sizeof(pci->busId), g->pci);
    pci->domain = g->pci_domain;
    pci->bus = g->pci_bus;
    pci->device = g->pci_device;
    pci->pciDeviceId = 0x20B510DE; /* NVIDIA's vendor id in the low half */
    pci->pciSubSystemId = 0x153310DE;
}

API nvmlReturn_t nvmlDeviceGetPciInfo_v3(void *device, nvmlPciInfo_t *pci)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    fill_pci(g, pci);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetPciInfo_v2(void *device, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(device, pci); }

API nvmlReturn_t nvmlDeviceGetPciInfo(void *device, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(device, pci); }

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

static void memory_now(const struct scenario *s, const struct gpu *g, unsigned long long *used)
{
    if (g->traces[T_MEMORY_USED].count) {
        double value = trace_value(&g->traces[T_MEMORY_USED], scenario_time(s));
        *used = value <= 0 ? 0ULL : (unsigned long long)value; /* int() truncates, as in the fake */
    } else {
        struct running r;
        running_processes(s, g, &r);
        *used = 0;
        for (unsigned int i = 0; i < r.count; i++)
            *used += r.memory[i];
        free_running(&r);
    }
    if (*used > g->memory_total)
        *used = g->memory_total;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *memory)
{
    DEVICE_CALL(CALL_MEMORY, device, g);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used;
    memory_now(s, g, &used);
    memory->total = g->memory_total;
    memory->used = used;
    memory->free = g->memory_total - used;
    return NVML_SUCCESS;
}

/*
 * Faults on `memory_reserved` (the field only _v2 gives) apply here, those on `memory` to the v1 call. As in
 * the driver, v1's used memory includes the reserved part and v2's does not.
 */
API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *memory)
{
    DEVICE_CALL(CALL_MEMORY_RESERVED, device, g);
    if (!memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long used;
    memory_now(s, g, &used);
    unsigned long long reserved = g->memory_reserved < used ? g->memory_reserved : used;
    memory->total = g->memory_total;
    memory->reserved = g->memory_reserved;
    memory->used = used - reserved;
    memory->free = g->memory_total - used;
    return NVML_SUCCESS;
}

typedef struct {
    unsigned int gpu, memory;
} nvmlUtilization_t;

API nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *rates)
{
    DEVICE_CALL(CALL_UTILIZATION, device, g);
    if (!rates)
        return NVML_ERROR_INVALID_ARGUMENT;
    double t = scenario_time(s);
    rates->gpu = (unsigned int)round_unsigned(trace_value(&g->traces[T_UTILIZATION], t) * 100.0);
    rates->memory = (unsigned int)round_unsigned(trace_value(&g->traces[T_MEMORY_UTILIZATION], t) * 100.0);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetPowerUsage(void *device, unsigned int *milliwatts)
{
    DEVICE_CALL(CALL_POWER, device, g);
    if (!milliwatts)
        return NVML_ERROR_INVALID_ARGUMENT;
    *milliwatts = (unsigned int)round_unsigned(trace_value(&g->traces[T_POWER], scenario_time(s)) * 1000.0);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetTemperature(void *device, int sensor, unsigned int *celsius)
{
    DEVICE_CALL(CALL_TEMPERATURE, device, g);
    if (!celsius)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (sensor != 0) /* NVML_TEMPERATURE_GPU is the only sensor */
        return NVML_ERROR_INVALID_ARGUMENT;
    *celsius = (unsigned int)round_unsigned(trace_value(&g->traces[T_TEMPERATURE], scenario_time(s)));
    return NVML_SUCCESS;
}

/* NVML_CLOCK_GRAPHICS 0, SM 1, MEM 2, VIDEO 3 */
static nvmlReturn_t clock_of(void *device, int type, unsigned int *mhz)
{
    int call = type == 2 ? CALL_MEMORY_CLOCK : CALL_SM_CLOCK;
    DEVICE_CALL(call, device, g);
    if (!mhz || type < 0 || type > 3)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (type == 3)
        return NVML_ERROR_NOT_SUPPORTED;
    int trace = type == 2 ? T_MEMORY_CLOCK : T_SM_CLOCK;
    *mhz = (unsigned int)round_unsigned(trace_value(&g->traces[trace], scenario_time(s)));
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetClockInfo(void *device, int type, unsigned int *mhz) { return clock_of(device, type, mhz); }

API nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *device, int error_type, int counter_type,
                                             unsigned long long *count)
{
    DEVICE_CALL(CALL_ECC, device, g);
    if (!count || error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* ecc[]: corrected volatile, uncorrected volatile, corrected aggregate, uncorrected aggregate */
    *count = g->ecc[counter_type * 2 + error_type];
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetEccMode(void *device, int *current, int *pending)
{
    DEVICE_CALL(CALL_ECC, device, g);
    if (!current || !pending)
        return NVML_ERROR_INVALID_ARGUMENT;
    *current = *pending = g->ecc_disabled ? 0 : 1;
    return NVML_SUCCESS;
}

/* NVML_PCIE_UTIL_TX_BYTES 0, RX 1; KiB/s */
API nvmlReturn_t nvmlDeviceGetPcieThroughput(void *device, int counter, unsigned int *kib_per_second)
{
    DEVICE_CALL(CALL_PCIE, device, g);
    if (!kib_per_second || counter < 0 || counter > 1)
        return NVML_ERROR_INVALID_ARGUMENT;
    double rate = trace_value(&g->traces[counter == 0 ? T_PCIE_TX : T_PCIE_RX], scenario_time(s));
    *kib_per_second = (unsigned int)round_unsigned(rate / 1024.0);
    return NVML_SUCCESS;
}

/* --- processes ------------------------------------------------------------------------------------- */

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
} nvmlProcessInfo_v1_t;

typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_v2_t;

static nvmlReturn_t processes_of(void *device, unsigned int *count, void *infos, int version)
{
    DEVICE_CALL(CALL_PROCESSES, device, g);
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct running r;
    running_processes(s, g, &r);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (*count < r.count || (!infos && r.count)) {
        ret = NVML_ERROR_INSUFFICIENT_SIZE;
    } else {
        for (unsigned int i = 0; i < r.count; i++) {
            if (version == 1) {
                nvmlProcessInfo_v1_t *p = (nvmlProcessInfo_v1_t *)infos + i;
                p->pid = r.pids[i];
                p->usedGpuMemory = r.memory[i];
            } else {
                nvmlProcessInfo_v2_t *p = (nvmlProcessInfo_v2_t *)infos + i;
                p->pid = r.pids[i];
                p->usedGpuMemory = r.memory[i];
                p->gpuInstanceId = p->computeInstanceId = 0xFFFFFFFFu;
            }
        }
    }
    *count = r.count;
    free_running(&r);
    return ret;
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned int *count, void *infos)
{
    return processes_of(device, count, infos, 3);
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(void *device, unsigned int *count, void *infos)
{
    return processes_of(device, count, infos, 2);
}

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(void *device, unsigned int *count, void *infos)
{
    return processes_of(device, count, infos, 1);
}

/* Simulated GPUs run compute work only. */
static nvmlReturn_t no_processes(void *device, unsigned int *count)
{
    DEVICE_CALL(CALL_PROCESSES, device, g);
    (void)g;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(void *device, unsigned int *count, void *infos)
{
    (void)infos;
    return no_processes(device, count);
}

API nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(void *device, unsigned int *count, void *infos)
{
    (void)infos;
    return no_processes(device, count);
}

API nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(void *device, unsigned int *count, void *infos)
{
    (void)infos;
    return no_processes(device, count);
}

API nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(void *device, unsigned int *count, void *infos)
{
    (void)infos;
    return no_processes(device, count);
}

/* --- XID events ---------------------------------------------------------------------------------- */

typedef struct {
    void *device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

API nvmlReturn_t nvmlEventSetCreate(struct event_set **set)
{
    if (!active(NULL))
        return NVML_ERROR_UNINITIALIZED;
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof(struct event_set));
    return *set ? NVML_SUCCESS : 20;
}

API nvmlReturn_t nvmlDeviceRegisterEvents(void *device, unsigned long long types, struct event_set *set)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!(types & EVENT_XID))
        return NVML_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    int known = 0;
    for (int i = 0; i < set->count; i++)
        known |= set->gpus[i] == g;
    if (!known) {
        if (set->count == (int)(sizeof(set->gpus) / sizeof(set->gpus[0])))
            ret = 23;
        else
            set->gpus[set->count++] = g;
    }
    pthread_mutex_unlock(&lock);
    return ret;
}

/*
 * XIDs whose time has come are delivered once per event set, including those before registration: the
 * count then equals the fake backend's (every XID up to now), which is what one scenario driving both needs.
 */
API nvmlReturn_t nvmlEventSetWait_v2(struct event_set *set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    unsigned long gen;
    struct scenario *s = active(&gen);
    if (!s)
        return NVML_ERROR_UNINITIALIZED;
    if (!set || !data)
        return NVML_ERROR_INVALID_ARGUMENT;
    double deadline = now_seconds() + timeout_ms / 1000.0;
    for (;;) {
        for (int i = 0; i < set->count; i++) {
            struct gpu *g = gpu_of(s, set->gpus[i]);
            if (!g)
                return NVML_ERROR_UNINITIALIZED; /* registered before a reload */
            nvmlReturn_t ret = enter(s, CALL_XID, (int)g->index, gen);
            if (ret != NVML_SUCCESS)
                return ret;
            double t = scenario_time(s);
            pthread_mutex_lock(&lock);
            int due = 0;
            while (due < g->xid_count && g->xids[due].at <= t)
                due++;
            int next = set->delivered[i];
            if (next < due)
                set->delivered[i]++;
            pthread_mutex_unlock(&lock);
            if (next < due) {
                memset(data, 0, sizeof(*data));
                data->device = g;
                data->eventType = EVENT_XID;
                data->eventData = g->xids[next].code;
                data->gpuInstanceId = data->computeInstanceId = 0xFFFFFFFFu;
                return NVML_SUCCESS;
            }
        }
        double left = deadline - now_seconds();
        if (left <= 0)
            return NVML_ERROR_TIMEOUT;
        sleep_seconds(left < EVENT_POLL_SECONDS ? left : EVENT_POLL_SECONDS);
        if (!active(NULL))
            return NVML_ERROR_UNINITIALIZED;
    }
}

API nvmlReturn_t nvmlEventSetFree(struct event_set *set)
{
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    free(set);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetSupportedEventTypes(void *device, unsigned long long *types)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    (void)g;
    if (!types)
        return NVML_ERROR_INVALID_ARGUMENT;
    *types = EVENT_XID;
    return NVML_SUCCESS;
}

/* --- NVLink and topology -------------------------------------------------------------------------- */

typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType;
    nvmlReturn_t nvmlReturn;
    union {
        double dVal;
        unsigned int uiVal;
        unsigned long ulVal;
        unsigned long long ullVal;
        long long sllVal;
        int siVal;
        unsigned short usVal;
    } value;
} nvmlFieldValue_t;

/* Errors that make a whole GPU or the library unusable are the call's result; others are per value. */
static int device_scope(nvmlReturn_t error)
{
    return error == 1 || error == 9 || error == 12 || error == 13 || error == 18 || error == 15 || error == 16 ||
           error == 28 || error < 0;
}

/* NVLink link of a per-link speed field (L0..L11), or -1 for any other field. */
static int speed_field_link(unsigned int field)
{
    if (field >= FI_NVLINK_SPEED_L0 && field < FI_NVLINK_SPEED_L0 + 6)
        return (int)(field - FI_NVLINK_SPEED_L0);
    if (field >= FI_NVLINK_SPEED_L6 && field < FI_NVLINK_SPEED_L6 + 6)
        return (int)(field - FI_NVLINK_SPEED_L6) + 6;
    return -1;
}

/* The scenario's call kind behind a field id (its faults apply to the value), or -1: not modelled. */
static int field_call(unsigned int field)
{
    if (field == FI_NVLINK_TX || field == FI_NVLINK_RX || field == FI_NVLINK_SPEED_COMMON ||
        field == FI_NVLINK_GET_SPEED || speed_field_link(field) >= 0)
        return CALL_NVLINK;
    if (field == FI_MEMORY_TEMP)
        return CALL_MEMORY_TEMPERATURE;
    return -1;
}

static unsigned int common_nvlink_speed(const struct gpu *g)
{
    unsigned int common = 0;
    for (unsigned int link = 0; link < g->nvlink_links; link++)
        if (!g->nvlink_down[link] && (common == 0 || g->nvlink_speed[link] < common))
            common = g->nvlink_speed[link];
    return common;
}

/* A value that is not a byte counter: memory temperature and NVLink speeds, as unsigned ints. */
static void other_field(const struct scenario *s, const struct gpu *g, nvmlFieldValue_t *v, double t)
{
    (void)s;
    v->valueType = VALUE_TYPE_UINT;
    v->nvmlReturn = NVML_SUCCESS;
    if (v->fieldId == FI_MEMORY_TEMP) {
        v->value.uiVal = (unsigned int)round_unsigned(trace_value(&g->traces[T_MEMORY_TEMPERATURE], t));
        return;
    }
    if (g->nvlink_links == 0) {
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        return;
    }
    if (v->fieldId == FI_NVLINK_SPEED_COMMON) {
        v->value.uiVal = common_nvlink_speed(g);
        return;
    }
    unsigned int link = v->fieldId == FI_NVLINK_GET_SPEED ? v->scopeId : (unsigned int)speed_field_link(v->fieldId);
    if (link >= g->nvlink_links)
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
    else
        v->value.uiVal = g->nvlink_down[link] ? 0 : g->nvlink_speed[link];
}

API nvmlReturn_t nvmlDeviceGetFieldValues(void *device, int count, nvmlFieldValue_t *values)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (count < 0 || (count > 0 && !values))
        return NVML_ERROR_INVALID_ARGUMENT;
    /* Each call kind asked for is entered once (delay, faults); a GPU- or library-wide error ends the call. */
    nvmlReturn_t entered[CALL_COUNT] = {0};
    int wanted[CALL_COUNT] = {0};
    for (int i = 0; i < count; i++) {
        int call = field_call(values[i].fieldId);
        if (call >= 0 && !wanted[call]) {
            wanted[call] = 1;
            entered[call] = enter(s, call, (int)g->index, gen_);
            if (entered[call] != NVML_SUCCESS && device_scope(entered[call]))
                return entered[call];
        }
    }
    double t = scenario_time(s);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
        v->latencyUsec = 0;
        v->valueType = VALUE_TYPE_ULL;
        v->value.ullVal = 0;
        int call = field_call(v->fieldId);
        if (call < 0) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            continue;
        }
        if (entered[call] != NVML_SUCCESS) {
            v->nvmlReturn = entered[call];
            continue;
        }
        if (v->fieldId != FI_NVLINK_TX && v->fieldId != FI_NVLINK_RX) {
            other_field(s, g, v, t);
            continue;
        }
        if (g->nvlink_links == 0) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            continue;
        }
        if (v->scopeId != ALL_LINKS && v->scopeId >= g->nvlink_links) {
            v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
            continue;
        }
        double bytes = trace_integral(&g->traces[v->fieldId == FI_NVLINK_TX ? T_NVLINK_TX : T_NVLINK_RX], t);
        unsigned long long kib = (unsigned long long)((unsigned long long)bytes / 1024ULL);
        v->value.ullVal = v->scopeId == ALL_LINKS ? kib : kib / g->nvlink_links;
        v->nvmlReturn = NVML_SUCCESS;
    }
    return NVML_SUCCESS;
}

static nvmlReturn_t link_check(struct gpu *g, unsigned int link)
{
    if (g->nvlink_links == 0)
        return NVML_ERROR_NOT_SUPPORTED;
    return link < g->nvlink_links ? NVML_SUCCESS : NVML_ERROR_INVALID_ARGUMENT;
}

API nvmlReturn_t nvmlDeviceGetNvLinkState(void *device, unsigned int link, int *is_active)
{
    DEVICE_CALL(CALL_NVLINK, device, g);
    nvmlReturn_t ret = link_check(g, link);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!is_active)
        return NVML_ERROR_INVALID_ARGUMENT;
    *is_active = g->nvlink_down[link] ? 0 : 1;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetNvLinkVersion(void *device, unsigned int link, unsigned int *version)
{
    DEVICE_CALL(CALL_NVLINK, device, g);
    nvmlReturn_t ret = link_check(g, link);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!version)
        return NVML_ERROR_INVALID_ARGUMENT;
    *version = 3;
    return NVML_SUCCESS;
}

/* Every capability (P2P, system memory access, atomics, SLI bridge, valid) is present on a simulated link. */
API nvmlReturn_t nvmlDeviceGetNvLinkCapability(void *device, unsigned int link, int capability,
                                               unsigned int *result)
{
    DEVICE_CALL(CALL_NVLINK, device, g);
    nvmlReturn_t ret = link_check(g, link);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!result || capability < 0 || capability > 5)
        return NVML_ERROR_INVALID_ARGUMENT;
    *result = 1;
    return NVML_SUCCESS;
}

/* NVLinks go to NVSwitches (one per link index, as on an HGX board) at bus 0xC0 + link. */
API nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(void *device, unsigned int link, nvmlPciInfo_t *pci)
{
    DEVICE_CALL(CALL_NVLINK, device, g);
    nvmlReturn_t ret = link_check(g, link);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!pci)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof(*pci));
    pci->bus = 0xC0 + link % 6;
    snprintf(pci->busId, sizeof(pci->busId), "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof(pci->busIdLegacy), "0000:%02X:00.0", pci->bus);
    pci->pciDeviceId = 0x1AF110DE;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo(void *device, unsigned int link, nvmlPciInfo_t *pci)
{
    return nvmlDeviceGetNvLinkRemotePciInfo_v2(device, link, pci);
}

API nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(void *device, unsigned int link, int *type)
{
    DEVICE_CALL(CALL_NVLINK, device, g);
    nvmlReturn_t ret = link_check(g, link);
    if (ret != NVML_SUCCESS)
        return ret;
    if (!type)
        return NVML_ERROR_INVALID_ARGUMENT;
    *type = NVLINK_DEVICE_TYPE_SWITCH;
    return NVML_SUCCESS;
}

/*
 * PCIe layout of a dual-socket HGX-style board: GPUs 2k and 2k+1 share a PCIe switch, the first half of
 * the GPUs hangs off socket 0 and the second half off socket 1.
 */
static int topology_level(const struct scenario *s, const struct gpu *a, const struct gpu *b)
{
    if (a == b)
        return TOPOLOGY_INTERNAL;
    if (a->index / 2 == b->index / 2)
        return TOPOLOGY_MULTIPLE;
    unsigned int half = (s->gpu_count + 1) / 2;
    return (a->index < half) == (b->index < half) ? TOPOLOGY_NODE : TOPOLOGY_SYSTEM;
}

API nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(void *device1, void *device2, int *level)
{
    DEVICE_CALL(CALL_DEVICE, device1, a);
    struct gpu *b = gpu_of(s, device2);
    if (!b || !level)
        return NVML_ERROR_INVALID_ARGUMENT;
    *level = topology_level(s, a, b);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetTopologyNearestGpus(void *device, int level, unsigned int *count, void **devices)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int found = 0;
    for (unsigned int i = 0; i < s->gpu_count; i++) {
        struct gpu *other = &s->gpus[i];
        if (other == g || topology_level(s, g, other) > level)
            continue;
        if (devices && found < *count)
            devices[found] = other;
        found++;
    }
    nvmlReturn_t ret = (*count < found && (devices || found)) ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    if (*count == 0 && !devices)
        ret = NVML_SUCCESS;
    *count = found;
    return ret;
}

API nvmlReturn_t nvmlDeviceGetP2PStatus(void *device1, void *device2, int index, int *status)
{
    DEVICE_CALL(CALL_DEVICE, device1, a);
    struct gpu *b = gpu_of(s, device2);
    if (!b || !status || index < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* 0 OK; 4 NOT_SUPPORTED for paths that do not exist on the board */
    int nvlink_index = 4;
    if (index == nvlink_index && (a->nvlink_links == 0 || b->nvlink_links == 0))
        *status = 4;
    else
        *status = 0;
    return NVML_SUCCESS;
}

/* The CPUs of the GPU's socket: this machine's CPUs split in halves like the GPUs. */
API nvmlReturn_t nvmlDeviceGetCpuAffinityWithinScope(void *device, unsigned int size, unsigned long *set, int scope)
{
    (void)scope;
    DEVICE_CALL(CALL_DEVICE, device, g);
    (void)g;
    if (!set || size == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(set, 0, size * sizeof(unsigned long));
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (sched_getaffinity(0, sizeof(cpus), &cpus) != 0)
        return NVML_ERROR_UNKNOWN;
    unsigned int bits = size * 8 * sizeof(unsigned long);
    for (unsigned int cpu = 0; cpu < bits && cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &cpus))
            set[cpu / (8 * sizeof(unsigned long))] |= 1UL << (cpu % (8 * sizeof(unsigned long)));
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCpuAffinity(void *device, unsigned int size, unsigned long *set)
{
    return nvmlDeviceGetCpuAffinityWithinScope(device, size, set, 1);
}

API nvmlReturn_t nvmlDeviceGetMemoryAffinity(void *device, unsigned int size, unsigned long *set, int scope)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    (void)scope;
    (void)g;
    if (!set || size == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(set, 0, size * sizeof(unsigned long));
    set[0] = 1;
    return NVML_SUCCESS;
}

/* --- GPM (GPU Performance Monitoring, Hopper and later) ------------------------------------------- */

/* nvml.h's struct versions and array bound (the layout nvidia-ml-py 12.x and 13.x pass). */
#define GPM_SUPPORT_VERSION 1
#define GPM_METRICS_GET_VERSION 1
#define GPM_METRIC_MAX 477
#define GPM_SAMPLE_MAGIC 0x47504d53u
#define MIB 1048576.0

/* The metrics modelled: NVML's id, the trace, NVML's unit per the trace's (percent of a ratio, MiB/s of
 * bytes/s). Each is the mean of its trace between the two samples, as fake.Trace.mean. */
static const struct gpm_metric {
    unsigned int id;
    int trace;
    double scale;
    const char *short_name, *long_name, *unit;
} GPM_METRICS[] = {
    {1, T_GRAPHICS_ACTIVE, 100.0, "gr_util", "graphics utilization", "%"},
    {2, T_SM_ACTIVE, 100.0, "sm_util", "SM utilization", "%"},
    {3, T_SM_OCCUPANCY, 100.0, "sm_occupancy", "SM occupancy", "%"},
    {5, T_TENSOR_ACTIVE, 100.0, "any_tensor_util", "any tensor utilization", "%"},
    {10, T_DRAM_ACTIVE, 100.0, "dram_bw_util", "DRAM bandwidth utilization", "%"},
    {20, T_PCIE_TX, 1.0 / MIB, "pcie_tx", "PCIe TX", "MiB/s"},
    {21, T_PCIE_RX, 1.0 / MIB, "pcie_rx", "PCIe RX", "MiB/s"},
    {60, T_NVLINK_RX, 1.0 / MIB, "nvlink_rx", "NVLink RX", "MiB/s"},
    {61, T_NVLINK_TX, 1.0 / MIB, "nvlink_tx", "NVLink TX", "MiB/s"},
};
#define GPM_METRIC_COUNT (sizeof(GPM_METRICS) / sizeof(GPM_METRICS[0]))

/* An nvmlGpmSample_t: which GPU, when, and each modelled metric's trace integral up to then. */
struct gpm_sample {
    unsigned int magic;
    const struct gpu *gpu; /* NULL until filled by nvmlGpmSampleGet */
    double at;
    double integral[GPM_METRIC_COUNT];
};

typedef struct {
    unsigned int version, isSupportedDevice;
} nvmlGpmSupport_t;

typedef struct {
    unsigned int metricId;
    nvmlReturn_t nvmlReturn;
    double value;
    struct {
        const char *shortName, *longName, *unit;
    } metricInfo;
} nvmlGpmMetric_t;

typedef struct {
    unsigned int version, numMetrics;
    struct gpm_sample *sample1, *sample2;
    nvmlGpmMetric_t metrics[GPM_METRIC_MAX];
} nvmlGpmMetricsGet_t;

/* Not subject to `gpm` faults: those fail the sample reads of a GPU that has GPM, as in the fake. */
API nvmlReturn_t nvmlGpmQueryDeviceSupport(void *device, nvmlGpmSupport_t *support)
{
    struct scenario *s = active(NULL);
    if (!s)
        return NVML_ERROR_UNINITIALIZED;
    const struct gpu *g = gpu_of(s, device);
    if (!g || !support)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (support->version != GPM_SUPPORT_VERSION)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    support->isSupportedDevice = (unsigned int)g->gpm;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpmSampleAlloc(struct gpm_sample **sample)
{
    if (!sample)
        return NVML_ERROR_INVALID_ARGUMENT;
    *sample = calloc(1, sizeof(**sample));
    if (!*sample)
        return NVML_ERROR_UNKNOWN;
    (*sample)->magic = GPM_SAMPLE_MAGIC;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpmSampleFree(struct gpm_sample *sample)
{
    if (!sample || sample->magic != GPM_SAMPLE_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    sample->magic = 0;
    free(sample);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpmSampleGet(void *device, struct gpm_sample *sample)
{
    DEVICE_CALL(CALL_GPM, device, g);
    if (!sample || sample->magic != GPM_SAMPLE_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->gpm)
        return NVML_ERROR_NOT_SUPPORTED;
    double t = scenario_time(s);
    sample->gpu = g;
    sample->at = t;
    for (size_t i = 0; i < GPM_METRIC_COUNT; i++)
        sample->integral[i] = trace_integral(&g->traces[GPM_METRICS[i].trace], t);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *request)
{
    if (!active(NULL))
        return NVML_ERROR_UNINITIALIZED;
    if (!request)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (request->version != GPM_METRICS_GET_VERSION)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    const struct gpm_sample *a = request->sample1, *b = request->sample2;
    if (request->numMetrics > GPM_METRIC_MAX || !a || !b || a->magic != GPM_SAMPLE_MAGIC ||
        b->magic != GPM_SAMPLE_MAGIC || !a->gpu || a->gpu != b->gpu || !(b->at > a->at))
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < request->numMetrics; i++) {
        nvmlGpmMetric_t *m = &request->metrics[i];
        m->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        m->value = 0;
        m->metricInfo.shortName = m->metricInfo.longName = m->metricInfo.unit = NULL;
        for (size_t k = 0; k < GPM_METRIC_COUNT; k++) {
            const struct gpm_metric *known = &GPM_METRICS[k];
            if (known->id != m->metricId)
                continue;
            m->value = (b->integral[k] - a->integral[k]) / (b->at - a->at) * known->scale;
            m->metricInfo.shortName = known->short_name;
            m->metricInfo.longName = known->long_name;
            m->metricInfo.unit = known->unit;
            m->nvmlReturn = NVML_SUCCESS;
        }
    }
    return NVML_SUCCESS;
}

/* --- health fields -------------------------------------------------------------------------------- */

static unsigned int percent(const struct trace *t, double at)
{
    return (unsigned int)round_unsigned(trace_value(t, at) * 100.0);
}

API nvmlReturn_t nvmlDeviceGetFanSpeed_v2(void *device, unsigned int fan, unsigned int *speed)
{
    DEVICE_CALL(CALL_FAN_SPEED, device, g);
    if (!speed || fan != 0) /* one fan per board */
        return NVML_ERROR_INVALID_ARGUMENT;
    *speed = percent(&g->traces[T_FAN_SPEED], scenario_time(s));
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetFanSpeed(void *device, unsigned int *speed)
{
    return nvmlDeviceGetFanSpeed_v2(device, 0, speed);
}

API nvmlReturn_t nvmlDeviceGetNumFans(void *device, unsigned int *count)
{
    DEVICE_CALL(CALL_FAN_SPEED, device, g);
    (void)g;
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = 1;
    return NVML_SUCCESS;
}

/* mJ since the driver loaded (scenario time 0): the integral of the power trace, as in the fake. */
API nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *millijoules)
{
    DEVICE_CALL(CALL_ENERGY, device, g);
    if (!millijoules)
        return NVML_ERROR_INVALID_ARGUMENT;
    *millijoules = round_unsigned(trace_integral(&g->traces[T_POWER], scenario_time(s)) * 1000.0);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetPcieReplayCounter(void *device, unsigned int *count)
{
    DEVICE_CALL(CALL_PCIE_REPLAY, device, g);
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    double replays = trace_integral(&g->traces[T_PCIE_REPLAY], scenario_time(s));
    *count = replays <= 0 ? 0u : (unsigned int)replays; /* whole replays, like int() in the fake */
    return NVML_SUCCESS;
}

static nvmlReturn_t codec_utilization(void *device, int call, int trace, unsigned int *util, unsigned int *period)
{
    DEVICE_CALL(call, device, g);
    if (!util || !period)
        return NVML_ERROR_INVALID_ARGUMENT;
    *util = percent(&g->traces[trace], scenario_time(s));
    *period = ENCODER_SAMPLING_US;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetEncoderUtilization(void *device, unsigned int *util, unsigned int *period)
{
    return codec_utilization(device, CALL_ENCODER_UTILIZATION, T_ENCODER, util, period);
}

API nvmlReturn_t nvmlDeviceGetDecoderUtilization(void *device, unsigned int *util, unsigned int *period)
{
    return codec_utilization(device, CALL_DECODER_UTILIZATION, T_DECODER, util, period);
}

API nvmlReturn_t nvmlDeviceGetRemappedRows(void *device, unsigned int *correctable, unsigned int *uncorrectable,
                                           unsigned int *pending, unsigned int *failed)
{
    DEVICE_CALL(CALL_REMAPPED_ROWS, device, g);
    if (!correctable || !uncorrectable || !pending || !failed)
        return NVML_ERROR_INVALID_ARGUMENT;
    *correctable = g->remapped[0];
    *uncorrectable = g->remapped[1];
    *pending = g->remapped[2];
    *failed = g->remapped[3];
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetRetiredPagesPendingStatus(void *device, int *pending)
{
    DEVICE_CALL(CALL_RETIRED_PAGES, device, g);
    if (!pending)
        return NVML_ERROR_INVALID_ARGUMENT;
    *pending = g->retired_pages_pending ? 1 : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(void *device, unsigned long long *reasons)
{
    DEVICE_CALL(CALL_CLOCK_EVENTS, device, g);
    if (!reasons)
        return NVML_ERROR_INVALID_ARGUMENT;
    *reasons = g->clock_event_reasons;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(void *device, unsigned long long *reasons)
{
    return nvmlDeviceGetCurrentClocksEventReasons(device, reasons);
}

/* --- topology: PCIe link and NVSwitch fabric ------------------------------------------------------- */

/* pcie_link[]: current generation, current width, max generation, max width, the GPU's max generation */
static nvmlReturn_t pcie_link_value(void *device, int which, unsigned int *value)
{
    DEVICE_CALL(CALL_PCIE, device, g);
    if (!value)
        return NVML_ERROR_INVALID_ARGUMENT;
    *value = g->pcie_link[which];
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(void *device, unsigned int *generation)
{
    return pcie_link_value(device, 0, generation);
}

API nvmlReturn_t nvmlDeviceGetCurrPcieLinkWidth(void *device, unsigned int *width)
{
    return pcie_link_value(device, 1, width);
}

API nvmlReturn_t nvmlDeviceGetMaxPcieLinkGeneration(void *device, unsigned int *generation)
{
    return pcie_link_value(device, 2, generation);
}

API nvmlReturn_t nvmlDeviceGetMaxPcieLinkWidth(void *device, unsigned int *width)
{
    return pcie_link_value(device, 3, width);
}

API nvmlReturn_t nvmlDeviceGetGpuMaxPcieLinkGeneration(void *device, unsigned int *generation)
{
    return pcie_link_value(device, 4, generation);
}

typedef struct {
    unsigned char clusterUuid[16];
    nvmlReturn_t status;
    unsigned int cliqueId, state;
} nvmlGpuFabricInfo_t;

typedef struct {
    unsigned int version;
    unsigned char clusterUuid[16];
    nvmlReturn_t status;
    unsigned int cliqueId, state, healthMask;
    unsigned char healthSummary; /* v3 only */
} nvmlGpuFabricInfoV_t;

/* The cluster UUID: fixed per scenario (one NVLink domain), zero until registration completes. */
static void fabric_uuid(const struct gpu *g, unsigned char *uuid)
{
    memset(uuid, 0, 16);
    if (g->fabric_state == 3)
        for (int i = 0; i < 16; i++)
            uuid[i] = (unsigned char)(0xA0 + i);
}

API nvmlReturn_t nvmlDeviceGetGpuFabricInfo(void *device, nvmlGpuFabricInfo_t *info)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!info)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!g->has_fabric)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(info, 0, sizeof(*info));
    fabric_uuid(g, info->clusterUuid);
    info->state = g->fabric_state;
    /* The status means something once the state is COMPLETED; NOT_READY before, as the driver answers. */
    info->status = g->fabric_state == 3 ? g->fabric_status : 27;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetGpuFabricInfoV(void *device, nvmlGpuFabricInfoV_t *info)
{
    DEVICE_CALL(CALL_DEVICE, device, g);
    if (!info)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != FABRIC_V2_VERSION && info->version != FABRIC_V3_VERSION)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    if (!g->has_fabric)
        return NVML_ERROR_NOT_SUPPORTED;
    unsigned int version = info->version;
    size_t size = version == FABRIC_V3_VERSION ? sizeof(*info) : offsetof(nvmlGpuFabricInfoV_t, healthSummary);
    memset(info, 0, size);
    info->version = version;
    fabric_uuid(g, info->clusterUuid);
    info->state = g->fabric_state;
    info->status = g->fabric_state == 3 ? g->fabric_status : 27;
    return NVML_SUCCESS;
}

/* Everything else NVML offers: declared by name, answering NOT_SUPPORTED. */
#define UNSUPPORTED(name)                                                                                \
    API nvmlReturn_t name(void) { return active(NULL) ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_UNINITIALIZED; }
#include "nvml_sim_unsupported.h"
