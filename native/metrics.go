// Command libhivemindmetrics is built with -buildmode=c-shared; its exports are the C ABI
// declared in hivemind_metrics.h (the hand-written header is the contract; see Makefile).
package main

/*
#define HM_NO_PROTOTYPES
#include "hivemind_metrics.h"
#include <string.h>
*/
import "C"

import (
	"sync"
	"unsafe"
)

const abiVersion = 2

// handle is one caller's state. Its mutex makes a handle safe to share between threads;
// separate handles never contend.
type handle struct {
	mu      sync.Mutex
	col     *Collector
	lastErr string
	closed  bool // set by hm_close; a call that looked the handle up just before must not reopen files
}

var (
	handlesMu sync.Mutex
	handles   = map[C.int]*handle{}
	nextID    C.int
)

func lookup(h C.int) *handle {
	handlesMu.Lock()
	defer handlesMu.Unlock()
	return handles[h]
}

//export hm_abi_version
func hm_abi_version() C.int { return abiVersion }

//export hm_open
func hm_open() C.int {
	handlesMu.Lock()
	defer handlesMu.Unlock()
	for i := 0; i < 1<<20; i++ { // skip ids still in use after wrap-around
		nextID++
		if nextID <= 0 {
			nextID = 1
		}
		if _, used := handles[nextID]; !used {
			handles[nextID] = &handle{col: NewCollector()}
			return nextID
		}
	}
	return -1
}

//export hm_close
func hm_close(handle C.int) C.int {
	handlesMu.Lock()
	defer handlesMu.Unlock()
	h, ok := handles[handle]
	if !ok {
		return -1
	}
	delete(handles, handle)
	h.mu.Lock() // wait out a snapshot in flight on another thread
	h.closed = true
	h.col.Close()
	h.mu.Unlock()
	return 0
}

//export hm_set_cgroup_root
func hm_set_cgroup_root(handle C.int, root *C.char) C.int {
	h := lookup(handle)
	if h == nil {
		return -1
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if root == nil || C.GoString(root) == "" {
		h.lastErr = "cgroup root must not be empty"
		return -1
	}
	h.col.CgroupRoot = C.GoString(root)
	return 0
}

//export hm_snapshot
func hm_snapshot(handle C.int, disk_path *C.char, cgroup_path *C.char, out *C.hm_snapshot_t) C.int {
	h := lookup(handle)
	if h == nil {
		return -1
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return -1
	}
	if out == nil {
		h.lastErr = "out must not be NULL"
		return -1
	}
	if out.size != C.uint32_t(unsafe.Sizeof(*out)) {
		h.lastErr = "hm_snapshot_t size mismatch: caller and library disagree on the ABI"
		return -1
	}
	disk, cg := "/", ""
	if disk_path != nil {
		disk = C.GoString(disk_path)
	}
	if cgroup_path != nil {
		cg = C.GoString(cgroup_path)
	}
	var s Snapshot
	if err := h.col.Collect(disk, cg, &s); err != nil {
		h.lastErr = err.Error()
		return -1
	}
	out.cpu_count = C.int32_t(s.CPUCount)
	out.cpu_busy = C.double(s.CPUBusy)
	out.load1, out.load5, out.load15 = C.double(s.Load1), C.double(s.Load5), C.double(s.Load15)
	out.mem_total, out.mem_available = C.uint64_t(s.MemTotal), C.uint64_t(s.MemAvailable)
	out.swap_total, out.swap_free = C.uint64_t(s.SwapTotal), C.uint64_t(s.SwapFree)
	out.disk_total, out.disk_free = C.uint64_t(s.DiskTotal), C.uint64_t(s.DiskFree)
	out.cgroup_version = C.int32_t(s.CgroupVersion)
	out.cgroup_found = 0
	if s.CgroupFound {
		out.cgroup_found = 1
	}
	out.cg_cpu_usage_ns = C.uint64_t(s.CgCPUUsageNs)
	out.cg_mem_current, out.cg_mem_peak = C.uint64_t(s.CgMemCurrent), C.uint64_t(s.CgMemPeak)
	out.cg_mem_limit = C.uint64_t(s.CgMemLimit)
	out.cg_pids_current, out.cg_pids_limit = C.uint64_t(s.CgPidsCurrent), C.uint64_t(s.CgPidsLimit)
	h.lastErr = ""
	return 0
}

//export hm_tree
func hm_tree(handle C.int, pid C.int, out *C.hm_tree_t) C.int {
	h := lookup(handle)
	if h == nil {
		return -1
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return -1
	}
	if out == nil {
		h.lastErr = "out must not be NULL"
		return -1
	}
	if out.size != C.uint32_t(unsafe.Sizeof(*out)) {
		h.lastErr = "hm_tree_t size mismatch: caller and library disagree on the ABI"
		return -1
	}
	if pid <= 0 {
		h.lastErr = "pid must be positive"
		return -1
	}
	var u TreeUsage
	if err := h.col.Tree(int(pid), &u); err != nil {
		h.lastErr = err.Error()
		return -1
	}
	out.found = 0
	if u.Found {
		out.found = 1
	}
	out.procs, out.cpu_ns, out.rss_bytes = C.uint64_t(u.Procs), C.uint64_t(u.CPUNs), C.uint64_t(u.RSSBytes)
	h.lastErr = ""
	return 0
}

//export hm_last_error
func hm_last_error(handle C.int, buf *C.char, buflen C.size_t) C.int {
	h := lookup(handle)
	if h == nil {
		return -1
	}
	h.mu.Lock()
	msg := h.lastErr
	h.mu.Unlock()
	if buf != nil && buflen > 0 {
		n := C.size_t(copy(unsafe.Slice((*byte)(unsafe.Pointer(buf)), int(buflen)-1), msg))
		*(*byte)(unsafe.Add(unsafe.Pointer(buf), n)) = 0
	}
	return C.int(len(msg))
}

func main() {}
