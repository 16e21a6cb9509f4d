package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"
)

func write(t *testing.T, root, rel, body string) {
	t.Helper()
	p := filepath.Join(root, rel)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
}

func fixture(t *testing.T) *Collector {
	root := t.TempDir()
	write(t, root, "proc/stat", "cpu  100 0 100 700 100 0 0 0 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2 3 4 5 6 7 8 9 10\nintr 1 2\n")
	write(t, root, "proc/meminfo", "MemTotal:       2048 kB\nMemFree: 1 kB\nMemAvailable:   1024 kB\nSwapTotal: 10 kB\nSwapFree: 5 kB\n")
	write(t, root, "proc/loadavg", "0.50 1.25 12.07 1/101 8500\n")
	write(t, root, "sys/devices/system/cpu/online", "0-3,8,10-11\n")
	c := NewCollector()
	c.ProcRoot, c.SysRoot, c.CgroupRoot = root+"/proc", root+"/sys", root+"/cg"
	c.loadFromProc = true
	return c
}

func TestCollectParsesProcFiles(t *testing.T) {
	c := fixture(t)
	var s Snapshot
	if err := c.Collect(t.TempDir(), "", &s); err != nil {
		t.Fatal(err)
	}
	if s.CPUCount != 2 {
		t.Errorf("cpu count %d, want 2 (the cpuN lines of /proc/stat)", s.CPUCount)
	}
	// total 1000 ticks (guest excluded), idle+iowait 800: busy 0.2 since boot.
	if s.CPUBusy < 0.199 || s.CPUBusy > 0.201 {
		t.Errorf("busy %v, want 0.2", s.CPUBusy)
	}
	if s.MemTotal != 2048*1024 || s.MemAvailable != 1024*1024 || s.SwapTotal != 10240 || s.SwapFree != 5120 {
		t.Errorf("memory %+v", s)
	}
	if s.Load1 != 0.5 || s.Load5 != 1.25 || s.Load15 < 12.069 || s.Load15 > 12.071 {
		t.Errorf("load %v %v %v", s.Load1, s.Load5, s.Load15)
	}
	if s.DiskTotal == 0 || s.DiskFree > s.DiskTotal {
		t.Errorf("disk %d/%d", s.DiskFree, s.DiskTotal)
	}
	if s.CgroupFound {
		t.Error("cgroup found though none was asked for")
	}
}

func TestBusyIsSincePreviousCall(t *testing.T) {
	c := fixture(t)
	var s Snapshot
	if err := c.Collect("/", "", &s); err != nil {
		t.Fatal(err)
	}
	// 100 more ticks, all busy.
	write(t, filepath.Dir(c.ProcRoot), "proc/stat", "cpu  200 0 100 700 100 0 0 0 50 0\ncpu0 1\nintr 0\n")
	if err := c.Collect("/", "", &s); err != nil {
		t.Fatal(err)
	}
	if s.CPUBusy != 1.0 {
		t.Errorf("busy %v, want 1.0", s.CPUBusy)
	}
}

func TestCgroupV2(t *testing.T) {
	c := fixture(t)
	cg := c.CgroupRoot
	write(t, cg, "cgroup.controllers", "cpu memory pids\n")
	write(t, cg, "task/cgroup.procs", "42\n")
	write(t, cg, "task/cpu.stat", "usage_usec 1500\nuser_usec 1000\n")
	write(t, cg, "task/memory.current", "4096\n")
	write(t, cg, "task/memory.max", "max\n")
	write(t, cg, "task/pids.current", "3\n")
	write(t, cg, "task/pids.max", "64\n")
	var s Snapshot
	if err := c.Collect("/", "/task/", &s); err != nil {
		t.Fatal(err)
	}
	want := Snapshot{CgroupVersion: 2, CgroupFound: true, CgCPUUsageNs: 1500000, CgMemCurrent: 4096,
		CgPidsCurrent: 3, CgPidsLimit: 64}
	got := Snapshot{CgroupVersion: s.CgroupVersion, CgroupFound: s.CgroupFound, CgCPUUsageNs: s.CgCPUUsageNs,
		CgMemCurrent: s.CgMemCurrent, CgMemPeak: s.CgMemPeak, CgMemLimit: s.CgMemLimit,
		CgPidsCurrent: s.CgPidsCurrent, CgPidsLimit: s.CgPidsLimit}
	if got != want {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	if err := c.Collect("/", "/gone", &s); err != nil || s.CgroupFound {
		t.Errorf("missing cgroup: err %v found %v", err, s.CgroupFound)
	}
	if err := c.Collect("/", "/../etc", &s); err == nil {
		t.Error("'..' accepted")
	}
}

func TestCgroupV1(t *testing.T) {
	c := fixture(t)
	cg := c.CgroupRoot
	write(t, cg, "memory/task/cgroup.procs", "42\n")
	write(t, cg, "memory/task/memory.usage_in_bytes", "8192\n")
	write(t, cg, "memory/task/memory.max_usage_in_bytes", "16384\n")
	write(t, cg, "memory/task/memory.limit_in_bytes", "9223372036854771712\n")
	write(t, cg, "cpuacct/task/cpuacct.usage", "123456789\n")
	write(t, cg, "pids/task/pids.current", "5\n")
	write(t, cg, "pids/task/pids.max", "max\n")
	var s Snapshot
	if err := c.Collect("/", "task", &s); err != nil {
		t.Fatal(err)
	}
	if !s.CgroupFound || s.CgroupVersion != 1 || s.CgMemCurrent != 8192 || s.CgMemPeak != 16384 ||
		s.CgMemLimit != 0 || s.CgCPUUsageNs != 123456789 || s.CgPidsCurrent != 5 || s.CgPidsLimit != 0 {
		t.Errorf("got %+v", s)
	}
}

func TestErrorsName(t *testing.T) {
	c := fixture(t)
	var s Snapshot
	if err := c.Collect("/nonexistent/disk", "", &s); err == nil {
		t.Error("statfs of a missing path succeeded")
	}
}

// Many snapshots must not grow the heap: the per-call garbage is small and collected.
func TestCollectDoesNotLeak(t *testing.T) {
	c := NewCollector()
	var s Snapshot
	var before, after runtime.MemStats
	for i := 0; i < 1000; i++ {
		_ = c.Collect("/", "/", &s)
	}
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 20000; i++ {
		if err := c.Collect("/", "/", &s); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if after.HeapAlloc > before.HeapAlloc+256*1024 {
		t.Errorf("heap grew from %d to %d", before.HeapAlloc, after.HeapAlloc)
	}
}

func TestCPUCountFallsBackToSysfsWhenStatIsCut(t *testing.T) {
	c := fixture(t)
	write(t, filepath.Dir(c.ProcRoot), "proc/stat", "cpu  1 0 1 7 1 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2")
	var s Snapshot
	if err := c.Collect("/", "", &s); err != nil {
		t.Fatal(err)
	}
	if s.CPUCount != 7 {
		t.Errorf("cpu count %d, want 7 (from 0-3,8,10-11)", s.CPUCount)
	}
}

func TestSysinfoLoadMatchesProc(t *testing.T) {
	c := NewCollector()
	var a, b Snapshot
	if err := c.load(&a); err != nil {
		t.Fatal(err)
	}
	c.loadFromProc = true
	if err := c.load(&b); err != nil {
		t.Fatal(err)
	}
	if d := a.Load1 - b.Load1; d > 0.05 || d < -0.05 {
		t.Errorf("sysinfo load1 %v vs /proc/loadavg %v", a.Load1, b.Load1)
	}
}

// Kept descriptors must see new contents.
func TestKeptFilesAreReadFresh(t *testing.T) {
	c := fixture(t)
	defer c.Close()
	root := filepath.Dir(c.ProcRoot)
	var s Snapshot
	if err := c.Collect("/", "", &s); err != nil {
		t.Fatal(err)
	}
	write(t, root, "proc/meminfo", "MemTotal: 4096 kB\nMemAvailable: 1 kB\n") // in place: same inode
	if err := c.Collect("/", "", &s); err != nil || s.MemTotal != 4096*1024 {
		t.Fatalf("after rewrite: %v %d", err, s.MemTotal)
	}
}

func TestFileCacheIsBounded(t *testing.T) {
	c := fixture(t)
	defer c.Close()
	dir := t.TempDir()
	for i := 0; i < maxOpenFiles+50; i++ {
		p := filepath.Join(dir, fmt.Sprint(i))
		write(t, dir, fmt.Sprint(i), "1\n")
		if c.readUint(p) != 1 {
			t.Fatal("read failed")
		}
	}
	if len(c.files) > maxOpenFiles {
		t.Errorf("%d files kept open", len(c.files))
	}
	c.Close()
	if len(c.files) != 0 {
		t.Errorf("%d files open after Close", len(c.files))
	}
}

func TestProcStatThroughKeptDescriptorAdvances(t *testing.T) {
	c := NewCollector()
	defer c.Close()
	b, err := c.read("/proc/stat")
	if err != nil {
		t.Fatal(err)
	}
	t1, _, _ := parseStatCPU(b)
	for i, x := 0, 0; i < 50_000_000; i++ { // burn a little CPU so the tick counters move
		x += i
	}
	b, _ = c.read("/proc/stat")
	t2, _, _ := parseStatCPU(b)
	if t2 <= t1 {
		t.Errorf("cpu ticks didn't advance through the kept descriptor: %d then %d", t1, t2)
	}
}

func TestTreeSumsDescendantsOnly(t *testing.T) {
	c := fixture(t)
	root := c.ProcRoot
	// 10 -> 11 -> 13, 10 -> 12 (zombie), and 20 (unrelated). Field 3 is the state, 4 the ppid,
	// 14-17 utime/stime/cutime/cstime, 24 rss in pages. 11's comm holds ") (" to trip naive parsers.
	stat := func(pid, comm, state string, ppid, ticks, rss int) string {
		return fmt.Sprintf("%s (%s) %s %d 0 0 0 0 0 0 0 0 0 %d 0 0 0 20 0 1 0 100 4096 %d 0 0\n",
			pid, comm, state, ppid, ticks, rss)
	}
	write(t, root, "10/stat", stat("10", "sh", "S", 1, 100, 10))
	write(t, root, "11/stat", stat("11", "py ) (x", "R", 10, 50, 20))
	write(t, root, "12/stat", stat("12", "dead", "Z", 10, 999, 999))
	write(t, root, "13/stat", stat("13", "w", "S", 11, 25, 30))
	write(t, root, "20/stat", stat("20", "other", "S", 1, 1000, 1000))
	write(t, root, "self/stat", "not a pid dir")
	var u TreeUsage
	if err := c.Tree(10, &u); err != nil {
		t.Fatal(err)
	}
	page := uint64(os.Getpagesize())
	if !u.Found || u.Procs != 3 {
		t.Fatalf("found %v procs %d, want 3 live processes (zombie and stranger left out)", u.Found, u.Procs)
	}
	if u.CPUNs != 175*10_000_000 {
		t.Errorf("cpu %d ns, want 1.75 s (175 ticks)", u.CPUNs)
	}
	if u.RSSBytes != 60*page {
		t.Errorf("rss %d, want %d", u.RSSBytes, 60*page)
	}
	if err := c.Tree(99, &u); err != nil || u.Found {
		t.Errorf("missing root: found %v err %v, want not found and no error", u.Found, err)
	}
}

func TestTreeByChildrenFiles(t *testing.T) {
	c := fixture(t)
	root := c.ProcRoot
	stat := func(pid, state string, ppid, ticks, rss int) string {
		return fmt.Sprintf("%s (x) %s %d 0 0 0 0 0 0 0 0 0 %d 0 0 0 20 0 1 0 100 4096 %d 0 0\n",
			pid, state, ppid, ticks, rss)
	}
	// 10 has two threads; the child 13 was forked by thread 15. 12 is a zombie; 20 unrelated.
	write(t, root, "10/stat", stat("10", "S", 1, 100, 10))
	write(t, root, "10/task/10/children", "11 12 ")
	write(t, root, "10/task/15/children", "13")
	write(t, root, "11/stat", stat("11", "R", 10, 50, 20))
	write(t, root, "11/task/11/children", "")
	write(t, root, "12/stat", stat("12", "Z", 10, 999, 999))
	write(t, root, "13/stat", stat("13", "S", 10, 25, 30))
	write(t, root, "13/task/13/children", "")
	write(t, root, "20/stat", stat("20", "S", 1, 1000, 1000))
	var u TreeUsage
	if err := c.Tree(10, &u); err != nil {
		t.Fatal(err)
	}
	if !u.Found || u.Procs != 3 || u.CPUNs != 175*10_000_000 || u.RSSBytes != 60*uint64(os.Getpagesize()) {
		t.Errorf("tree %+v: want 3 procs, 1.75 s, 60 pages (threads' children included, zombie out)", u)
	}
}

func TestTreeOfThisProcess(t *testing.T) {
	c := NewCollector()
	var u TreeUsage
	if err := c.Tree(os.Getpid(), &u); err != nil {
		t.Fatal(err)
	}
	if !u.Found || u.Procs < 1 || u.RSSBytes == 0 {
		t.Errorf("own tree %+v: want found, at least 1 process, some memory", u)
	}
}
