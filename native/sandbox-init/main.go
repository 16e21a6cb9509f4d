// hm-sandbox-init prepares a venv task's mount namespace and then execs the task's command
// line: what namespaces.py's `sh -c` init does, in one process. The shell spends ~25 ms on
// ten mount/umount/awk/sort processes per task; this takes about a millisecond.
//
//	hm-sandbox-init --tmpfs-kib N [--writable DIR] [--hide-under DIR] [KEEP...] -- ARGV...
//
// Run as root inside fresh PID and mount namespaces (unshare --pid --fork --mount-proc):
//  1. every KEEP path is opened (O_PATH) before anything hides it;
//  2. a fresh tmpfs (nosuid, nodev, mode 1777, N KiB) goes over each private dir that exists;
//  3. a KEEP path hidden by one is recreated inside it and bind-mounted back from its fd;
//  4. mounts of Podman, network namespaces, user runtime dirs (and under --hide-under) are
//     lazily unmounted, deepest first, all but the KEEP paths;
//  5. --writable is bind-mounted onto itself, / is remounted read-only (its other flags kept),
//     and the working directory becomes --writable;
//  6. the fds are closed and ARGV[0] (looked up in PATH) replaces this process.
//
// Any failure exits 125 with the reason on stderr, before anything of the task runs.
package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"syscall"
)

const oPath = 0x200000 // O_PATH, which Go 1.19's syscall package lacks

var privateDirs = []string{"/tmp", "/var/tmp", "/dev/shm", "/run/lock"}

// The same patterns as namespaces.FOREIGN_MOUNTS; `*` matches any run of characters, '/' too
// (as in a shell `case`).
var foreignMounts = []string{"*/containers/storage/*", "/var/lib/containers/*",
	"/run/containers/*", "/run/netns/*", "/run/user/*"}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "hm-sandbox-init: "+format+"\n", args...)
	os.Exit(125)
}

type options struct {
	tmpfsKiB  int
	writable  string
	hideUnder string
	keep      []string
	argv      []string
}

func parse(args []string) options {
	var o options
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			o.argv = args[i+1:]
			if len(o.argv) == 0 {
				fail("no command after --")
			}
			return o
		case a == "--tmpfs-kib" || a == "--writable" || a == "--hide-under":
			if i+1 >= len(args) {
				fail("%s needs a value", a)
			}
			i++
			switch a {
			case "--tmpfs-kib":
				n, err := strconv.Atoi(args[i])
				if err != nil || n < 1 {
					fail("--tmpfs-kib: %q is not a positive number", args[i])
				}
				o.tmpfsKiB = n
			case "--writable":
				o.writable = args[i]
			default:
				o.hideUnder = args[i]
			}
		case strings.HasPrefix(a, "--"):
			fail("unknown option %s", a)
		default:
			o.keep = append(o.keep, a)
		}
	}
	fail("no -- before the command")
	return o
}

// match reports whether s matches pattern, where '*' matches any string.
func match(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	if len(parts) == 1 {
		return pattern == s
	}
	if !strings.HasPrefix(s, parts[0]) {
		return false
	}
	s = s[len(parts[0]):]
	for _, p := range parts[1 : len(parts)-1] {
		i := strings.Index(s, p)
		if i < 0 {
			return false
		}
		s = s[i+len(p):]
	}
	return strings.HasSuffix(s, parts[len(parts)-1])
}

// unescape undoes mountinfo's octal escapes (\040 for a space, \011, \012, \134).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func mountPoints() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		fail("read mountinfo: %v", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			out = append(out, unescape(fields[4]))
		}
	}
	if err := sc.Err(); err != nil {
		fail("read mountinfo: %v", err)
	}
	return out
}

func isDir(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.IsDir()
}

// Per-mount flags statfs reports that a bind remount must repeat, or it would clear them.
var keptFlags = []struct{ st, ms uintptr }{
	{0x2, syscall.MS_NOSUID}, {0x4, syscall.MS_NODEV}, {0x8, syscall.MS_NOEXEC},
	{0x400, syscall.MS_NOATIME}, {0x800, syscall.MS_NODIRATIME}, {0x1000, syscall.MS_RELATIME},
}

func main() {
	o := parse(os.Args[1:])
	fds := make([]int, len(o.keep))
	for i, k := range o.keep {
		fd, err := syscall.Open(k, oPath|syscall.O_CLOEXEC, 0)
		if err != nil {
			fail("open %s: %v", k, err)
		}
		fds[i] = fd
	}
	data := fmt.Sprintf("mode=1777,size=%dk", o.tmpfsKiB)
	for _, d := range privateDirs {
		if !isDir(d) {
			continue
		}
		if err := syscall.Mount("hivemind-private", d, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, data); err != nil {
			fail("mount tmpfs on %s: %v", d, err)
		}
	}
	for i, k := range o.keep {
		if isDir(k) {
			continue
		}
		if err := os.MkdirAll(k, 0o755); err != nil {
			fail("mkdir %s: %v", k, err)
		}
		if err := syscall.Mount(fmt.Sprintf("/proc/self/fd/%d", fds[i]), k, "", syscall.MS_BIND, ""); err != nil {
			fail("bind %s back: %v", k, err)
		}
	}
	patterns := append([]string{}, foreignMounts...)
	if o.hideUnder != "" {
		patterns = append(patterns, o.hideUnder+"/*")
	}
	keep := map[string]bool{}
	for _, k := range o.keep {
		keep[k] = true
	}
	points := mountPoints()
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, m := range points {
		if keep[m] {
			continue
		}
		for _, p := range patterns {
			if match(p, m) {
				_ = syscall.Unmount(m, syscall.MNT_DETACH) // gone already, or not ours: fine
				break
			}
		}
	}
	if o.writable != "" {
		if !keep[o.writable] {
			fail("--writable %s is not one of the kept paths", o.writable)
		}
		if err := syscall.Mount(o.writable, o.writable, "", syscall.MS_BIND, ""); err != nil {
			fail("bind %s onto itself: %v", o.writable, err)
		}
		var st syscall.Statfs_t
		if err := syscall.Statfs("/", &st); err != nil {
			fail("statfs /: %v", err)
		}
		flags := uintptr(syscall.MS_REMOUNT | syscall.MS_BIND | syscall.MS_RDONLY)
		for _, f := range keptFlags {
			if uintptr(st.Flags)&f.st != 0 {
				flags |= f.ms
			}
		}
		if err := syscall.Mount("none", "/", "", flags, ""); err != nil {
			fail("remount / read-only: %v", err)
		}
		// Again after the remount: the inherited cwd is on the old, now read-only, view.
		if err := syscall.Chdir(o.writable); err != nil {
			fail("chdir %s: %v", o.writable, err)
		}
	}
	for _, fd := range fds {
		syscall.Close(fd)
	}
	path, err := exec.LookPath(o.argv[0])
	if err != nil {
		fail("%s: %v", o.argv[0], err)
	}
	err = syscall.Exec(path, o.argv, os.Environ())
	fail("exec %s: %v", path, err)
}
