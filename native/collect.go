package main

// Pure-Go collection: no cgo here, so `go test` exercises it directly. Files are read into a
// per-collector buffer with raw syscalls and parsed as bytes, so a snapshot allocates almost
// nothing and the GC has little to do between calls.

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
)

// Snapshot mirrors hm_snapshot_t (minus its size field).
type Snapshot struct {
	CPUCount      int32
	CPUBusy       float64
	Load1         float64
	Load5         float64
	Load15        float64
	MemTotal      uint64
	MemAvailable  uint64
	SwapTotal     uint64
	SwapFree      uint64
	DiskTotal     uint64
	DiskFree      uint64
	CgroupVersion int32
	CgroupFound   bool
	CgCPUUsageNs  uint64
	CgMemCurrent  uint64
	CgMemPeak     uint64
	CgMemLimit    uint64
	CgPidsCurrent uint64
	CgPidsLimit   uint64
}

// v1 reports "no limit" as a huge page-aligned number; anything this large is unlimited.
const unlimitedThreshold = uint64(1) << 62

// Collector holds what must survive between snapshots: the previous CPU counters (for the
// busy fraction) and the read buffer.
type Collector struct {
	ProcRoot   string // "/proc"; tests point it at a fixture tree
	SysRoot    string // "/sys"
	CgroupRoot string // "/sys/fs/cgroup"
	// loadFromProc reads ProcRoot/loadavg instead of sysinfo(2) (fixture tests).
	loadFromProc bool

	layoutRoot string // CgroupRoot when unified was last decided
	unified    bool   // cgroup v2 only (else v1 or hybrid)

	prevTotal uint64
	prevIdle  uint64
	havePrev  bool
	buf       [65536]byte
	files     map[string]*openFile
	tick      uint64
}

func NewCollector() *Collector {
	return &Collector{ProcRoot: "/proc", SysRoot: "/sys", CgroupRoot: "/sys/fs/cgroup"}
}

var errNotExist = errors.New("no such file")

// maxOpenFiles bounds the descriptors one collector keeps open: 6 files per cgroup for about
// 20 cgroups, plus /proc/stat and /proc/meminfo.
const maxOpenFiles = 128

// openFile is a descriptor kept between snapshots. Re-reading from offset 0 makes procfs and
// cgroupfs generate fresh contents, and skips the path walk of open(2): ten times cheaper for
// a cgroup file than open+read+close.
type openFile struct {
	fd      int
	lastUse uint64
}

// read returns the start of a file (up to len(buf)) in the shared buffer; valid until the next read.
func (c *Collector) read(path string) ([]byte, error) {
	c.tick++
	if f, ok := c.files[path]; ok {
		if b, err := c.readFd(f.fd); err == nil {
			f.lastUse = c.tick
			return b, nil
		}
		// ENODEV: the cgroup was removed (and maybe made again); look the path up afresh.
		syscall.Close(f.fd)
		delete(c.files, path)
	}
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		if err == syscall.ENOENT || err == syscall.ENOTDIR {
			return nil, errNotExist
		}
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	b, err := c.readFd(fd)
	if err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	c.keep(path, fd)
	return b, nil
}

func (c *Collector) readFd(fd int) ([]byte, error) {
	n := 0
	for n < len(c.buf) {
		m, err := syscall.Pread(fd, c.buf[n:], int64(n))
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if m == 0 {
			break
		}
		n += m
	}
	return c.buf[:n], nil
}

func (c *Collector) keep(path string, fd int) {
	if c.files == nil {
		c.files = make(map[string]*openFile)
	}
	if len(c.files) >= maxOpenFiles {
		oldest, oldestUse := "", ^uint64(0)
		for p, f := range c.files {
			if f.lastUse < oldestUse {
				oldest, oldestUse = p, f.lastUse
			}
		}
		syscall.Close(c.files[oldest].fd)
		delete(c.files, oldest)
	}
	c.files[path] = &openFile{fd: fd, lastUse: c.tick}
}

// Close releases every kept descriptor; the collector stays usable.
func (c *Collector) Close() {
	for p, f := range c.files {
		syscall.Close(f.fd)
		delete(c.files, p)
	}
}

// Collect fills s. cgroupPath is relative to each hierarchy; "" skips the cgroup.
func (c *Collector) Collect(diskPath, cgroupPath string, s *Snapshot) error {
	*s = Snapshot{}
	if err := c.cpu(s); err != nil {
		return err
	}
	if err := c.memory(s); err != nil {
		return err
	}
	if err := c.load(s); err != nil {
		return err
	}
	if err := c.disk(diskPath, s); err != nil {
		return err
	}
	if cgroupPath != "" {
		if err := c.cgroup(cgroupPath, s); err != nil {
			return err
		}
	}
	return nil
}

func (c *Collector) cpu(s *Snapshot) error {
	b, err := c.read(c.ProcRoot + "/stat")
	if err != nil {
		return err
	}
	total, idle, ok := parseStatCPU(b)
	if !ok {
		return errors.New("/proc/stat: no aggregate cpu line")
	}
	// /proc/stat lists one line per online CPU, so the count comes free with the same read;
	// only when the buffer cut the list short is the sysfs list read.
	n, complete := countStatCPUs(b)
	if !complete {
		if b, err = c.read(c.SysRoot + "/devices/system/cpu/online"); err != nil {
			return err
		}
		n = countCPUList(b)
	}
	s.CPUCount = int32(n)
	dt, di := total, idle
	if c.havePrev && total >= c.prevTotal && idle >= c.prevIdle {
		dt, di = total-c.prevTotal, idle-c.prevIdle
	}
	c.prevTotal, c.prevIdle, c.havePrev = total, idle, true
	if dt > 0 && di <= dt {
		s.CPUBusy = float64(dt-di) / float64(dt)
	}
	return nil
}

func (c *Collector) memory(s *Snapshot) error {
	b, err := c.read(c.ProcRoot + "/meminfo")
	if err != nil {
		return err
	}
	for len(b) > 0 {
		var line []byte
		line, b = cutLine(b)
		key, rest, ok := cutByte(line, ':')
		if !ok {
			continue
		}
		var dst *uint64
		switch string(key) { // no allocation: the compiler special-cases switch on string(bytes)
		case "MemTotal":
			dst = &s.MemTotal
		case "MemAvailable":
			dst = &s.MemAvailable
		case "SwapTotal":
			dst = &s.SwapTotal
		case "SwapFree":
			dst = &s.SwapFree
		default:
			continue
		}
		v, _ := parseUint(trimSpace(rest))
		*dst = v * 1024 // meminfo says kB and means KiB
	}
	if s.MemTotal == 0 {
		return errors.New("/proc/meminfo: no MemTotal")
	}
	return nil
}

// load takes the load averages from sysinfo(2): one syscall instead of reading /proc/loadavg,
// and the same kernel figures (fixed point, 16 fraction bits).
func (c *Collector) load(s *Snapshot) error {
	if c.loadFromProc {
		return c.loadProc(s)
	}
	var si syscall.Sysinfo_t
	if err := syscall.Sysinfo(&si); err != nil {
		return fmt.Errorf("sysinfo: %w", err)
	}
	const scale = 1 << 16
	s.Load1 = float64(si.Loads[0]) / scale
	s.Load5 = float64(si.Loads[1]) / scale
	s.Load15 = float64(si.Loads[2]) / scale
	return nil
}

func (c *Collector) loadProc(s *Snapshot) error {
	b, err := c.read(c.ProcRoot + "/loadavg")
	if err != nil {
		return err
	}
	f := fields(b, 3)
	if len(f) < 3 {
		return errors.New("/proc/loadavg: too few fields")
	}
	s.Load1, s.Load5, s.Load15 = parseDecimal(f[0]), parseDecimal(f[1]), parseDecimal(f[2])
	return nil
}

func (c *Collector) disk(path string, s *Snapshot) error {
	if path == "" {
		path = "/"
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", path, err)
	}
	s.DiskTotal = st.Blocks * uint64(st.Frsize)
	s.DiskFree = st.Bavail * uint64(st.Frsize)
	return nil
}

func (c *Collector) cgroup(rel string, s *Snapshot) error {
	if strings.Contains(rel, "..") {
		return errors.New("cgroup path must not contain '..'")
	}
	rel = "/" + strings.Trim(rel, "/")
	if rel == "/" {
		rel = ""
	}
	// A pure v2 host has cgroup.controllers at the root; a hybrid v1 host keeps its
	// controllers in per-controller hierarchies and an empty v2 tree under unified/.
	if c.layoutRoot != c.CgroupRoot { // the layout of a mounted hierarchy doesn't change
		c.layoutRoot, c.unified = c.CgroupRoot, exists(c.CgroupRoot+"/cgroup.controllers")
	}
	if c.unified {
		return c.cgroupV2(c.CgroupRoot+rel, s)
	}
	return c.cgroupV1(rel, s)
}

func (c *Collector) cgroupV2(dir string, s *Snapshot) error {
	b, err := c.read(dir + "/memory.current")
	if err == errNotExist {
		if !exists(dir + "/cgroup.procs") { // a cgroup without the memory controller enabled
			return nil
		}
	} else if err != nil {
		return err
	} else {
		s.CgMemCurrent, _ = parseUint(trimSpace(b))
	}
	if b, err := c.read(dir + "/cpu.stat"); err == nil {
		for len(b) > 0 {
			var line []byte
			line, b = cutLine(b)
			if key, rest, ok := cutByte(line, ' '); ok && string(key) == "usage_usec" {
				v, _ := parseUint(trimSpace(rest))
				s.CgCPUUsageNs = v * 1000
			}
		}
	}
	s.CgMemPeak = c.readUint(dir + "/memory.peak")
	s.CgMemLimit = c.readLimit(dir + "/memory.max")
	s.CgPidsCurrent = c.readUint(dir + "/pids.current")
	s.CgPidsLimit = c.readLimit(dir + "/pids.max")
	s.CgroupVersion, s.CgroupFound = 2, true
	return nil
}

func (c *Collector) cgroupV1(rel string, s *Snapshot) error {
	mem := c.CgroupRoot + "/memory" + rel
	// The memory hierarchy decides whether the cgroup exists: it's the one a task's limits live in.
	// The first read doubles as the existence check (one syscall fewer than a stat).
	b, err := c.read(mem + "/memory.usage_in_bytes")
	if err == errNotExist {
		return nil
	} else if err != nil {
		return err
	}
	s.CgMemCurrent, _ = parseUint(trimSpace(b))
	s.CgMemPeak = c.readUint(mem + "/memory.max_usage_in_bytes")
	s.CgMemLimit = c.readLimit(mem + "/memory.limit_in_bytes")
	s.CgCPUUsageNs = c.readUint(c.CgroupRoot + "/cpuacct" + rel + "/cpuacct.usage")
	pids := c.CgroupRoot + "/pids" + rel
	s.CgPidsCurrent = c.readUint(pids + "/pids.current")
	s.CgPidsLimit = c.readLimit(pids + "/pids.max")
	s.CgroupVersion, s.CgroupFound = 1, true
	return nil
}

// exists stats rather than reads: a root cgroup.procs lists every PID on the machine.
func exists(path string) bool {
	var st syscall.Stat_t
	return syscall.Stat(path, &st) == nil
}

// readUint reads a one-number file; a missing or odd file reads as 0 (e.g. pids.current
// doesn't exist in a v1 root cgroup, memory.peak is missing before Linux 5.19).
func (c *Collector) readUint(path string) uint64 {
	b, err := c.read(path)
	if err != nil {
		return 0
	}
	v, _ := parseUint(trimSpace(b))
	return v
}

// readLimit reads a limit file; "max", huge v1 values and missing files all mean unlimited (0).
func (c *Collector) readLimit(path string) uint64 {
	b, err := c.read(path)
	if err != nil {
		return 0
	}
	v, ok := parseUint(trimSpace(b))
	if !ok || v >= unlimitedThreshold {
		return 0
	}
	return v
}

// parseStatCPU sums the aggregate "cpu" line of /proc/stat the way psutil does: guest time is
// already inside user/nice, so it's left out of the total; idle includes iowait.
func parseStatCPU(b []byte) (total, idle uint64, ok bool) {
	line, _ := cutLine(b)
	f := fields(line, 11)
	if len(f) < 5 || string(f[0]) != "cpu" {
		return 0, 0, false
	}
	for i := 1; i < len(f) && i <= 8; i++ { // user nice system idle iowait irq softirq steal
		v, _ := parseUint(f[i])
		total += v
		if i == 4 || i == 5 {
			idle += v
		}
	}
	return total, idle, true
}

// countStatCPUs counts the "cpuN" lines of /proc/stat; complete is false when the buffer ended
// before the list did.
func countStatCPUs(b []byte) (n int, complete bool) {
	_, b = cutLine(b) // the aggregate line
	for len(b) > 0 {
		var line []byte
		var more bool
		line, b, more = cutByteRest(b, '\n')
		if !more {
			return n, false // last line is cut off, or the file has nothing after the CPUs
		}
		if len(line) > 3 && string(line[:3]) == "cpu" && line[3] >= '0' && line[3] <= '9' {
			n++
			continue
		}
		return n, true
	}
	return n, false
}

// countCPUList counts the CPUs in a kernel list such as "0-3,8,10-11".
func countCPUList(b []byte) int {
	b = trimSpace(b)
	n := 0
	for len(b) > 0 {
		var part []byte
		part, b, _ = cutByteRest(b, ',')
		lo, hi, isRange := cutByte(part, '-')
		if !isRange {
			n++
			continue
		}
		a, _ := parseUint(lo)
		z, _ := parseUint(hi)
		if z >= a {
			n += int(z-a) + 1
		}
	}
	return n
}

func cutLine(b []byte) (line, rest []byte) {
	line, rest, _ = cutByteRest(b, '\n')
	return line, rest
}

// cutByte splits at the first sep; ok is false (and before is b) when sep is absent.
func cutByte(b []byte, sep byte) (before, after []byte, ok bool) {
	for i, ch := range b {
		if ch == sep {
			return b[:i], b[i+1:], true
		}
	}
	return b, nil, false
}

func cutByteRest(b []byte, sep byte) (before, after []byte, ok bool) {
	return cutByte(b, sep)
}

func isSpace(ch byte) bool { return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' }

func trimSpace(b []byte) []byte {
	for len(b) > 0 && isSpace(b[0]) {
		b = b[1:]
	}
	for len(b) > 0 && isSpace(b[len(b)-1]) {
		b = b[:len(b)-1]
	}
	return b
}

// fields splits on white space, at most max fields, into a small stack-friendly slice.
func fields(b []byte, max int) [][]byte {
	out := make([][]byte, 0, max)
	for len(b) > 0 && len(out) < max {
		for len(b) > 0 && isSpace(b[0]) {
			b = b[1:]
		}
		i := 0
		for i < len(b) && !isSpace(b[i]) {
			i++
		}
		if i > 0 {
			out = append(out, b[:i])
		}
		b = b[i:]
	}
	return out
}

// parseUint reads leading decimal digits; ok is false when there are none (e.g. "max").
func parseUint(b []byte) (v uint64, ok bool) {
	for _, ch := range b {
		if ch < '0' || ch > '9' {
			break
		}
		v = v*10 + uint64(ch-'0')
		ok = true
	}
	return v, ok
}

// parseDecimal reads a non-negative "12.34" as found in /proc/loadavg.
func parseDecimal(b []byte) float64 {
	ip, fp, _ := cutByte(b, '.')
	i, _ := parseUint(ip)
	v := float64(i)
	scale := 0.1
	for _, ch := range fp {
		if ch < '0' || ch > '9' {
			break
		}
		v += float64(ch-'0') * scale
		scale /= 10
	}
	return v
}
