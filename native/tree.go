package main

// Usage of a process tree from /proc: the fallback when the kernel keeps no cgroup for a task
// (rootless Podman on cgroup v1, the venv executor). One call lists /proc once, reads each
// process's stat once, and sums the descendants of the root: no per-process round trip from
// Python.

import (
	"os"
	"strconv"
	"syscall"
)

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every Linux architecture
// user space can see (the kernel converts from its own HZ).
const clockTicks = 100

// TreeUsage mirrors hm_tree_t (minus its size field).
type TreeUsage struct {
	Found    bool   // the root process exists
	Procs    uint64 // live processes in the tree, the root included; zombies are not counted
	CPUNs    uint64 // user+system time of live members and the children they have reaped
	RSSBytes uint64 // summed resident set sizes (shared pages count once per process)
}

type procStat struct {
	ppid  int
	ticks uint64
	rss   uint64 // pages
}

// parseProcStat reads the fields tree usage needs from one /proc/PID/stat. The comm field may
// hold spaces and parentheses, so fields are counted after its last ')'.
func parseProcStat(b []byte) (st procStat, zombie bool, ok bool) {
	end := -1
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ')' {
			end = i
			break
		}
	}
	if end < 0 || end+2 > len(b) {
		return st, false, false
	}
	f := fields(b[end+2:], 22) // state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14) ... rss(21)
	if len(f) < 22 {
		return st, false, false
	}
	if len(f[0]) == 1 && (f[0][0] == 'Z' || f[0][0] == 'X') {
		return st, true, true
	}
	ppid, ok1 := parseUint(f[1])
	if !ok1 {
		return st, false, false
	}
	st.ppid = int(ppid)
	for _, x := range f[11:15] {
		v, _ := parseUint(x)
		st.ticks += v
	}
	st.rss, _ = parseUint(f[21])
	return st, false, true
}

// Tree sums the process tree rooted at pid into u. Where the kernel lists each thread's
// children (/proc/PID/task/TID/children, CONFIG_PROC_CHILDREN), only the tree's own files are
// read; otherwise every process's stat is read once to find the parent links.
func (c *Collector) Tree(pid int, u *TreeUsage) error {
	*u = TreeUsage{}
	p := strconv.Itoa(pid)
	if exists(c.ProcRoot + "/" + p + "/task/" + p + "/children") {
		return c.treeByChildren(pid, u)
	}
	return c.treeByScan(pid, u)
}

// readStat reads and parses /proc/PID/stat; ok is false when the process is gone or unreadable.
func (c *Collector) readStat(path string) (st procStat, zombie bool, ok bool) {
	// Not kept open like cgroup files: PIDs come and go, and a kept descriptor of a dead
	// process would read nothing while its PID is reused.
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return st, false, false
	}
	b, err := c.readFd(fd)
	syscall.Close(fd)
	if err != nil {
		return st, false, false
	}
	return parseProcStat(b)
}

func (c *Collector) treeByChildren(pid int, u *TreeUsage) error {
	page := uint64(os.Getpagesize())
	queue := []int{pid}
	seen := map[int]bool{pid: true}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		dir := c.ProcRoot + "/" + strconv.Itoa(p)
		st, zombie, ok := c.readStat(dir + "/stat")
		if !ok || zombie {
			continue // gone while we looked, or holding nothing
		}
		if p == pid {
			u.Found = true
		}
		u.Procs++
		u.CPUNs += st.ticks * (1_000_000_000 / clockTicks)
		u.RSSBytes += st.rss * page
		tasks, err := readDirNames(dir + "/task")
		if err != nil {
			continue
		}
		for _, tid := range tasks {
			b, err := c.readSmall(dir + "/task/" + tid + "/children")
			if err != nil {
				continue
			}
			for len(b) > 0 { // "PID PID ... " without allocating a slice of fields
				for len(b) > 0 && isSpace(b[0]) {
					b = b[1:]
				}
				i := 0
				for i < len(b) && !isSpace(b[i]) {
					i++
				}
				if ch, ok := parseUint(b[:i]); ok && !seen[int(ch)] {
					seen[int(ch)] = true
					queue = append(queue, int(ch))
				}
				b = b[i:]
			}
		}
	}
	return nil
}

func readDirNames(path string) ([]string, error) {
	d, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return d.Readdirnames(-1)
}

func (c *Collector) readSmall(path string) ([]byte, error) {
	fd, err := syscall.Open(path, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer syscall.Close(fd)
	return c.readFd(fd)
}

func (c *Collector) treeByScan(pid int, u *TreeUsage) error {
	dir, err := os.Open(c.ProcRoot)
	if err != nil {
		return err
	}
	names, err := dir.Readdirnames(-1)
	dir.Close()
	if err != nil {
		return err
	}
	stats := make(map[int]procStat, len(names))
	children := make(map[int][]int, len(names))
	for _, name := range names {
		if name[0] < '0' || name[0] > '9' {
			continue
		}
		p, err := strconv.Atoi(name)
		if err != nil {
			continue
		}
		st, zombie, ok := c.readStat(c.ProcRoot + "/" + name + "/stat")
		if !ok || zombie {
			continue
		}
		stats[p] = st
		children[st.ppid] = append(children[st.ppid], p)
	}
	if _, ok := stats[pid]; !ok {
		return nil
	}
	page := uint64(os.Getpagesize())
	u.Found = true
	queue := []int{pid}
	seen := map[int]bool{pid: true}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		st := stats[p]
		u.Procs++
		u.CPUNs += st.ticks * (1_000_000_000 / clockTicks)
		u.RSSBytes += st.rss * page
		for _, ch := range children[p] {
			if !seen[ch] {
				seen[ch] = true
				queue = append(queue, ch)
			}
		}
	}
	return nil
}
