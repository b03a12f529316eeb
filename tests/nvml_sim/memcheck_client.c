/* Exercises every modelled entry point of the simulated libnvidia-ml, for a valgrind memcheck run. */
#include <stdio.h>
#include <string.h>

typedef void *nvml_device;
typedef struct {
    char legacy[16];
    unsigned int domain, bus, device, id, sub;
    char bus_id[32];
} pci_t;
typedef struct {
    unsigned long long total, free, used;
} mem_t;
typedef struct {
    unsigned int gpu, memory;
} util_t;
typedef struct {
    unsigned int pid;
    unsigned long long used;
    unsigned int gi, ci;
} proc_t;
typedef struct {
    void *device;
    unsigned long long type, data;
    unsigned int gi, ci;
} event_t;
typedef struct {
    unsigned int id, scope;
    long long ts, latency;
    int type, ret;
    unsigned long long value;
} field_t;
typedef struct {
    unsigned int version, supported;
} gpm_support_t;
typedef struct {
    unsigned int id;
    int ret;
    double value;
    const char *short_name, *long_name, *unit;
} gpm_metric_t;
typedef struct {
    unsigned int version, count;
    void *sample1, *sample2;
    gpm_metric_t metrics[477];
} gpm_get_t;

int nvmlInitWithFlags(unsigned int);
int nvmlShutdown(void);
const char *nvmlErrorString(int);
int nvmlSystemGetDriverVersion(char *, unsigned int);
int nvmlSystemGetNVMLVersion(char *, unsigned int);
int nvmlDeviceGetCount_v2(unsigned int *);
int nvmlDeviceGetHandleByIndex_v2(unsigned int, nvml_device *);
int nvmlDeviceGetHandleByUUID(const char *, nvml_device *);
int nvmlDeviceGetName(nvml_device, char *, unsigned int);
int nvmlDeviceGetUUID(nvml_device, char *, unsigned int);
int nvmlDeviceGetPciInfo_v3(nvml_device, pci_t *);
int nvmlDeviceGetMemoryInfo(nvml_device, mem_t *);
int nvmlDeviceGetUtilizationRates(nvml_device, util_t *);
int nvmlDeviceGetPowerUsage(nvml_device, unsigned int *);
int nvmlDeviceGetTemperature(nvml_device, int, unsigned int *);
int nvmlDeviceGetClockInfo(nvml_device, int, unsigned int *);
int nvmlDeviceGetTotalEccErrors(nvml_device, int, int, unsigned long long *);
int nvmlDeviceGetPcieThroughput(nvml_device, int, unsigned int *);
int nvmlDeviceGetFieldValues(nvml_device, int, field_t *);
int nvmlDeviceGetComputeRunningProcesses_v3(nvml_device, unsigned int *, proc_t *);
int nvmlDeviceGetNvLinkState(nvml_device, unsigned int, int *);
int nvmlDeviceGetTopologyCommonAncestor(nvml_device, nvml_device, int *);
int nvmlEventSetCreate(void **);
int nvmlDeviceRegisterEvents(nvml_device, unsigned long long, void *);
int nvmlEventSetWait_v2(void *, event_t *, unsigned int);
int nvmlEventSetFree(void *);
int nvmlDeviceGetFanSpeed(nvml_device, unsigned int *);
int nvmlDeviceGetSerial(nvml_device, char *, unsigned int);
int nvmlDeviceGetTotalEnergyConsumption(nvml_device, unsigned long long *);
int nvmlDeviceGetRemappedRows(nvml_device, unsigned int *, unsigned int *, unsigned int *, unsigned int *);
int nvmlDeviceGetCurrPcieLinkWidth(nvml_device, unsigned int *);
int nvmlDeviceGetGpuFabricInfoV(nvml_device, void *);
int nvmlGpmQueryDeviceSupport(nvml_device, gpm_support_t *);
int nvmlGpmSampleAlloc(void **);
int nvmlGpmSampleFree(void *);
int nvmlGpmSampleGet(nvml_device, void *);
int nvmlGpmMetricsGet(gpm_get_t *);

/* Two GPM samples and the metrics between them; on a GPU without GPM the sample calls fail. */
static int gpm_round_trip(nvml_device dev)
{
    static const unsigned int ids[] = {1, 2, 3, 5, 10, 20, 21, 60, 61, 4};
    int failures = 0;
    gpm_support_t support = {.version = 1};
    failures += nvmlGpmQueryDeviceSupport(dev, &support) != 0;
    void *first = NULL, *second = NULL;
    failures += nvmlGpmSampleAlloc(&first) != 0 || nvmlGpmSampleAlloc(&second) != 0;
    int got = nvmlGpmSampleGet(dev, first) == 0 && nvmlGpmSampleGet(dev, second) == 0;
    failures += support.supported ? !got : got;
    static gpm_get_t request;
    memset(&request, 0, sizeof(request));
    request.version = 1;
    request.count = sizeof(ids) / sizeof(ids[0]);
    request.sample1 = first;
    request.sample2 = second;
    for (unsigned int k = 0; k < request.count; k++)
        request.metrics[k].id = ids[k];
    if (support.supported && nvmlGpmMetricsGet(&request) == 0) {
        for (unsigned int k = 0; k < request.count; k++)
            if (request.metrics[k].ret == 0)
                failures += strlen(request.metrics[k].short_name) == 0;
        failures += request.metrics[request.count - 1].ret != 3; /* integer util: not modelled */
    }
    request.version = 2;
    failures += nvmlGpmMetricsGet(&request) != 25; /* ARGUMENT_VERSION_MISMATCH */
    failures += nvmlGpmSampleFree(first) != 0;
    failures += nvmlGpmSampleFree(second) != 0;
    return failures;
}

static int round_trip(void)
{
    char text[96];
    unsigned int count = 0, value;
    unsigned long long big;
    int failures = 0, level, active;
    if (nvmlInitWithFlags(0) != 0)
        return 1;
    failures += nvmlSystemGetDriverVersion(text, sizeof(text)) != 0;
    failures += nvmlSystemGetNVMLVersion(text, sizeof(text)) != 0;
    failures += nvmlDeviceGetCount_v2(&count) != 0 || count == 0;
    void *events = NULL;
    failures += nvmlEventSetCreate(&events) != 0;
    for (unsigned int i = 0; i < count; i++) {
        nvml_device dev, other;
        pci_t pci;
        mem_t mem;
        util_t util;
        proc_t procs[8];
        field_t fields[2] = {{.id = 138, .scope = 0xFFFFFFFFu}, {.id = 139, .scope = 0}};
        failures += nvmlDeviceGetHandleByIndex_v2(i, &dev) != 0;
        failures += nvmlDeviceGetUUID(dev, text, sizeof(text)) != 0;
        failures += nvmlDeviceGetHandleByUUID(text, &other) != 0 || other != dev;
        failures += nvmlDeviceGetName(dev, text, sizeof(text)) != 0;
        failures += nvmlDeviceGetName(dev, text, 4) != 7; /* too small a buffer */
        failures += nvmlDeviceGetPciInfo_v3(dev, &pci) != 0;
        /* Field faults in the scenario may fail these; only memory errors matter here. */
        nvmlDeviceGetMemoryInfo(dev, &mem);
        nvmlDeviceGetUtilizationRates(dev, &util);
        nvmlDeviceGetPowerUsage(dev, &value);
        nvmlDeviceGetTemperature(dev, 0, &value);
        nvmlDeviceGetClockInfo(dev, 1, &value);
        nvmlDeviceGetClockInfo(dev, 2, &value);
        nvmlDeviceGetTotalEccErrors(dev, 0, 1, &big);
        nvmlDeviceGetPcieThroughput(dev, 0, &value);
        nvmlDeviceGetFieldValues(dev, 2, fields);
        nvmlDeviceGetNvLinkState(dev, 0, &active);
        unsigned int n = 0;
        nvmlDeviceGetComputeRunningProcesses_v3(dev, &n, NULL);
        n = 8;
        nvmlDeviceGetComputeRunningProcesses_v3(dev, &n, procs);
        failures += nvmlDeviceGetTopologyCommonAncestor(dev, dev, &level) != 0 || level != 0;
        failures += nvmlDeviceGetSerial(dev, text, sizeof(text)) != 3;
        /* Health and topology calls: memory temperature and NVLink speeds come as field values. */
        unsigned int rows[4];
        field_t more[3] = {{.id = 82, .scope = 0}, {.id = 84, .scope = 0}, {.id = 90, .scope = 0}};
        unsigned char fabric[64] = {0};
        unsigned int fabric_version = 0x03000028u;
        memcpy(fabric, &fabric_version, sizeof(fabric_version));
        nvmlDeviceGetFanSpeed(dev, &value);
        nvmlDeviceGetTotalEnergyConsumption(dev, &big);
        nvmlDeviceGetRemappedRows(dev, &rows[0], &rows[1], &rows[2], &rows[3]);
        nvmlDeviceGetCurrPcieLinkWidth(dev, &value);
        nvmlDeviceGetFieldValues(dev, 3, more);
        nvmlDeviceGetGpuFabricInfoV(dev, fabric);
        failures += nvmlDeviceRegisterEvents(dev, 8, events) != 0;
        failures += gpm_round_trip(dev);
    }
    event_t event;
    while (nvmlEventSetWait_v2(events, &event, 0) == 0) {
    }
    failures += nvmlEventSetFree(events) != 0;
    failures += strlen(nvmlErrorString(15)) == 0;
    failures += nvmlShutdown() != 0;
    return failures;
}

int main(void)
{
    /* Twice: a second init after shutdown reloads the scenario. */
    int failures = round_trip() + round_trip();
    printf("failures %d\n", failures);
    return failures != 0;
}
