// hm-ns-mount mounts task workspaces in the mount namespace it runs in. The worker starts one
// per rootless Podman pause namespace (nsenter --mount) where the host's mounts do not
// propagate (a host whose / is private: systemd makes it shared), and keeps it: two nsenter
// and two mount(8) processes per task become two lines on a pipe.
//
//	hm-ns-mount --under DIR
//
// Requests on stdin, one per line, fields split by a tab; each gets one line back on stdout,
// "ok" or "error <reason>":
//
//	ping                    (answers ok: the helper runs, in its namespace)
//	mount DEVICE TARGET     mounts the ext4 filesystem on DEVICE (/dev/loopN) on TARGET,
//	                        nosuid and nodev
//	umount TARGET           detaches TARGET (lazily: a process may still hold a file)
//
// TARGET must be a clean absolute path under DIR. EOF on stdin ends it (the worker's end of the
// pipe closes when the worker exits, however it exits).
package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
)

const mntDetach = 2 // MNT_DETACH

var loopDevice = regexp.MustCompile(`^/dev/loop[0-9]+$`)

func underRoot(root, target string) error {
	if !filepath.IsAbs(target) || filepath.Clean(target) != target {
		return fmt.Errorf("target %q is not a clean absolute path", target)
	}
	if !strings.HasPrefix(target, root+"/") {
		return fmt.Errorf("target %q is not under %s", target, root)
	}
	return nil
}

func serve(root string, fields []string) error {
	switch {
	case len(fields) == 1 && fields[0] == "ping":
		return nil
	case len(fields) == 3 && fields[0] == "mount":
		if !loopDevice.MatchString(fields[1]) {
			return fmt.Errorf("device %q is not a loop device", fields[1])
		}
		if err := underRoot(root, fields[2]); err != nil {
			return err
		}
		return syscall.Mount(fields[1], fields[2], "ext4", syscall.MS_NOSUID|syscall.MS_NODEV, "")
	case len(fields) == 2 && fields[0] == "umount":
		if err := underRoot(root, fields[1]); err != nil {
			return err
		}
		return syscall.Unmount(fields[1], mntDetach)
	}
	return fmt.Errorf("unknown request %q", strings.Join(fields, " "))
}

func main() {
	if len(os.Args) != 3 || os.Args[1] != "--under" || !filepath.IsAbs(os.Args[2]) {
		fmt.Fprintln(os.Stderr, "usage: hm-ns-mount --under DIR")
		os.Exit(2)
	}
	root := filepath.Clean(os.Args[2])
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		reply := "ok"
		if err := serve(root, strings.Split(in.Text(), "\t")); err != nil {
			reply = "error " + strings.ReplaceAll(err.Error(), "\n", " ")
		}
		fmt.Fprintln(out, reply)
		if out.Flush() != nil {
			os.Exit(1)
		}
	}
}
