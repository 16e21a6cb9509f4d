/*
 * hivemind_metrics.h: C ABI of libhivemindmetrics (hand-written; `make check-header` compares
 * its prototypes with the ones Go generates, so the two can't drift apart silently).
 *
 * Rules of the ABI, after tailscale's libtailscale:
 *   - State lives behind integer handles (hm_open/hm_close), never in globals the caller shares.
 *   - Every buffer is caller-owned: no Go memory crosses the boundary, nothing to free.
 *   - Calls return 0 on success and -1 on failure; hm_last_error() says why.
 *   - Any change to a struct layout or a signature bumps HM_ABI_VERSION; callers check
 *     hm_abi_version() before the first other call.
 *
 * A process that has loaded this library must not fork() without exec(): the Go runtime's
 * threads don't survive it and the child hangs. fork+exec (subprocess) is fine.
 */
#ifndef HIVEMIND_METRICS_H
#define HIVEMIND_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define HM_ABI_VERSION 2

/* One reading of the machine and, optionally, of one cgroup. Filled by hm_snapshot(). */
typedef struct hm_snapshot {
    uint32_t size;            /* set by the caller to sizeof(hm_snapshot_t); checked */
    int32_t  cpu_count;       /* logical CPUs online */
    double   cpu_busy;        /* busy fraction 0..1 since the previous call on this handle
                                 (since boot on the first call) */
    double   load1;
    double   load5;
    double   load15;
    uint64_t mem_total;       /* bytes */
    uint64_t mem_available;   /* bytes (MemAvailable) */
    uint64_t swap_total;      /* bytes */
    uint64_t swap_free;       /* bytes */
    uint64_t disk_total;      /* bytes of the file system holding disk_path */
    uint64_t disk_free;       /* bytes available to unprivileged users */
    int32_t  cgroup_version;  /* 1 or 2 when cgroup_found, else 0 */
    int32_t  cgroup_found;    /* 1: the cg_* fields are valid; 0: not asked for, or gone */
    uint64_t cg_cpu_usage_ns; /* CPU time used by the cgroup */
    uint64_t cg_mem_current;  /* bytes */
    uint64_t cg_mem_peak;     /* bytes; 0 when the kernel doesn't say */
    uint64_t cg_mem_limit;    /* bytes; 0 when unlimited */
    uint64_t cg_pids_current;
    uint64_t cg_pids_limit;   /* 0 when unlimited */
} hm_snapshot_t;

/* A process tree's usage from /proc, for tasks the kernel keeps no cgroup for. Filled by hm_tree(). */
typedef struct hm_tree {
    uint32_t size;            /* set by the caller to sizeof(hm_tree_t); checked */
    int32_t  found;           /* 1: the root process exists; 0: the other fields are 0 */
    uint64_t procs;           /* live processes in the tree, the root included (no zombies) */
    uint64_t cpu_ns;          /* user+system time of live members and of children they reaped */
    uint64_t rss_bytes;       /* summed resident set sizes */
} hm_tree_t;

#ifndef HM_NO_PROTOTYPES
#ifdef __cplusplus
extern "C" {
#endif

/* HM_ABI_VERSION of the library. */
int hm_abi_version(void);

/* A new handle (> 0), or -1. */
int hm_open(void);

/* Releases a handle; 0, or -1 for an unknown handle. */
int hm_close(int handle);

/* Where cgroup hierarchies are mounted (default "/sys/fs/cgroup"); for tests and odd hosts. */
int hm_set_cgroup_root(int handle, const char* root);

/*
 * Reads the machine's figures, the file system holding disk_path, and the cgroup at
 * cgroup_path (relative to each controller's hierarchy, e.g. "/machine.slice/x.scope"; NULL
 * or "" for none) into *out, all in one call. A cgroup that doesn't exist is not an error:
 * cgroup_found is 0. Returns 0, or -1 (see hm_last_error).
 */
int hm_snapshot(int handle, const char* disk_path, const char* cgroup_path, hm_snapshot_t* out);

/*
 * Sums the process tree rooted at pid (pid and every descendant, by parent links in
 * /proc/PID/stat) into *out, listing /proc once. A pid that doesn't exist is not an error:
 * found is 0. Returns 0, or -1 (see hm_last_error).
 */
int hm_tree(int handle, int pid, hm_tree_t* out);

/*
 * Copies the handle's last error message into buf (NUL-terminated, truncated to buflen-1 bytes)
 * and returns the message's full length, or -1 for an unknown handle.
 */
int hm_last_error(int handle, char* buf, size_t buflen);

#ifdef __cplusplus
}
#endif
#endif /* HM_NO_PROTOTYPES */
#endif /* HIVEMIND_METRICS_H */
