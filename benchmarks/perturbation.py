"""Perturbation: how much each tracer slows the traced container's pings.

A throwaway testbed (`Testbed(containers_n=1 + LOAD, masquerade=True)`) carries a paced
ping from container 0 to the peer, `ping -n -D -c N -i I`, once per tracer configuration
and round.  The configurations all record the same events: the tracepoints and in-kernel
device filters that `discover(...).plan().probes(formats)` gives for container 0, i.e. exactly
what mace opens (bpftrace, which cannot use those filters, compares device names in its
own program and correlates in the kernel):

    none      nothing traced (the baseline of the round)
    mace      the real CLI, `python -m mace trace --netns PATH -q -f jsonl -o /dev/null`
    mace-xmit the same with --end-at-xmit (egress to the uplink's driver: one sample more)
    ftrace    a tracefs instance (instances/mace_bench) with the same events and filters,
              recording into its own kernel buffer while `cat trace_pipe > /dev/null` reads it
    perf      `perf record -a -q -B -o TMP -e TP --filter F ...` for the same probes
    bpftrace  a script doing mace's correlation in the kernel: maps keyed by skbaddr,
              histograms of the egress and ingress deltas

and three that take mace apart (where its cost goes, and what a cheaper ring would save):

    hits      `perf stat -a` counting mace's tracepoints, unfiltered: every hit builds its
              record and counts, none is written anywhere (what the tracepoints cost before
              a single sample); its counts give the hits per round trip
    ftrace-noread  the ftrace configuration with no reader: the same events and filters
              written into the instance's ring, which nobody reads or waits on (no wakeups)
    ftrace-raw  that ring read as a capture on it would read it: each CPU's trace_pipe_raw
              without blocking, every 50 ms, on CLOCK_MONOTONIC (pages thrown away)

Rounds are interleaved, each in a rotated order (A B C D E, then B C D E A, ...), so that
drift over the run (other load on the host, the VM's neighbours) hits every configuration
alike.  The added RTT of a configuration is the median over rounds of (its median RTT
minus the `none` median of the same round), with the spread of those per-round
differences.  Optional load: LOAD co-located containers flooding the peer (`ping -f`)
for the whole phase.  Full: loads 0, 2 and 4, R=16, N=300, I=3 ms; quick: load 0, R=2, N=60,
none/mace/ftrace/ftrace-raw only.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import busy_since, cpu_sample, pyplot, save, tracefs_mounts, wait_quiet

CONFIGS = ["none", "mace", "mace-xmit", "ftrace", "perf", "bpftrace", "hits", "ftrace-noread",
           "ftrace-raw"]
QUICK_CONFIGS = ["none", "mace", "ftrace", "ftrace-raw"]
TARGET_US = 3.0
TRACEFS = Path("/sys/kernel/tracing")
INSTANCE = "mace_bench"
SETTLE_S = 0.5            # after a tracer is ready (and for `none`): let its start-up burst pass
MACE_MIN_START_S = 1.0    # mace is given at least this long before the settle time starts
READY_TIMEOUT_S = 15.0
QUIET_LIMIT_S = 1.0       # at load 0, wait at most this long for the CPUs to go idle ...
QUIET_BELOW = 0.15        # ... i.e. less than this share busy, before each run
STOP_TIMEOUT_S = 15.0
COLORS = {"none": "tab:gray", "mace": "tab:blue", "mace-xmit": "tab:cyan", "ftrace": "tab:orange",
          "perf": "tab:green",
          "bpftrace": "tab:purple", "hits": "tab:olive", "ftrace-noread": "tab:brown",
          "ftrace-raw": "tab:pink"}


def _params(quick: bool) -> dict:
    if quick:
        return {"loads": [0], "rounds": 2, "count": 60, "interval": 0.003,
                "configs": list(QUICK_CONFIGS), "budget_s": 36.0}
    # idle rounds spread by tens of µs on a shared VM: many rounds, and loads to plot the growth
    return {"loads": [0, 2, 4], "rounds": 16, "count": 300, "interval": 0.003,
            "configs": list(CONFIGS), "budget_s": 1100.0}


# -- tracefs mount -------------------------------------------------------------------------------

class TracefsMount:
    """tracefs at /sys/kernel/tracing for the whole benchmark (ftrace's instance needs it;
    perf and bpftrace look tracepoints up there too, and perf would otherwise mount it
    itself and leave it mounted).  Unmounted afterwards if we mounted it."""

    def __init__(self):
        self.mounted_by_us = False
        self.was_mounted = False
        self.root = TRACEFS

    def __enter__(self) -> TracefsMount:
        mounts = tracefs_mounts()
        self.was_mounted = bool(mounts)
        if str(TRACEFS) in mounts:
            self.root = TRACEFS
        elif mounts:
            self.root = Path(mounts[0])
        else:
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True,
                           capture_output=True, text=True, timeout=10)
            self.mounted_by_us = True
            self.root = TRACEFS
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        if self.mounted_by_us:
            # an instance left behind (it should not be) would keep the mount busy
            inst = self.root / "instances" / INSTANCE
            if inst.exists():
                try:
                    inst.rmdir()
                except OSError:
                    pass
            r = subprocess.run(["umount", str(self.root)], capture_output=True, text=True,
                               timeout=10)
            if r.returncode == 0:
                self.mounted_by_us = False

    def restored(self) -> bool:
        """The mount table shows tracefs exactly as before the benchmark."""
        return bool(tracefs_mounts()) == self.was_mounted


# -- processes -----------------------------------------------------------------------------------

def _perf_fds(pid: int) -> int:
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[perf_event]":
                    n += 1
            except OSError:
                pass
    except OSError:
        return -1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is gone for our purposes only once reaped; report it as alive
    return True


def _reap(proc: subprocess.Popen, sig: int = signal.SIGINT,
          timeout: float = STOP_TIMEOUT_S) -> dict:
    """Signal `proc`, wait for it (SIGKILL after `timeout`) with os.wait4, and return its
    exit status and CPU time (user + sys of it and its reaped children)."""
    killed = False
    if proc.returncode is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    ru = None
    status = None
    while True:
        try:
            pid, st, r = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            status, ru = st, r
            break
        if time.monotonic() > deadline and not killed:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            deadline = time.monotonic() + 10
        elif killed and time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if status is not None:
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "killed": killed,
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 4) if ru else None,
            "user_s": round(ru.ru_utime, 4) if ru else None,
            "sys_s": round(ru.ru_stime, 4) if ru else None}


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace").strip()[-n:]
    except OSError:
        return ""


# -- tracers -------------------------------------------------------------------------------------

class Ctx:
    """What every tracer needs to know about the run."""

    def __init__(self, tb, probes, plan, tracefs_root: Path, tmp: Path, formats: dict | None = None):
        self.tb = tb
        self.ns_path = tb.ns_path(tb.containers[0].ns)
        self.probes = probes
        from mace.plan import Plan
        # the plan that ends egress at the uplink's driver (mace --end-at-xmit)
        self.xmit_probes = Plan(plan.containers, plan.uplink, end_at_queue=False).probes(formats)
        self.inner = plan.containers[0].inner
        self.veth = plan.containers[0].veth
        self.uplink = plan.uplink
        self.tracefs = tracefs_root
        self.tmp = tmp
        self.ncpu = len(_online_cpus())
        self.pids: list[int] = []        # every tracer process started, for the final check


def _online_cpus() -> list[int]:
    from mace.capture.perf import online_cpus
    return online_cpus()


class NoTracer:
    name = "none"

    def start(self, ctx: Ctx) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def stop(self) -> dict:
        return {}


class _Proc:
    """A tracer that is one subprocess, stopped with SIGINT."""

    name = "?"

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.out: Path | None = None
        self.err: Path | None = None

    def _spawn(self, ctx: Ctx, argv: list[str]) -> None:
        self.out = ctx.tmp / f"{self.name}.out"
        self.err = ctx.tmp / f"{self.name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e,
                                         cwd=str(ctx.tmp))
        ctx.pids.append(self.proc.pid)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    def _wait_fds(self, want: int, min_s: float = 0.0) -> None:
        """Until the process holds `want` perf events (it opened them all)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} while starting: "
                                   f"{_tail(self.err)}")
            if _perf_fds(self.proc.pid) >= want and time.monotonic() - t0 >= min_s:
                return
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} did not open its {want} perf events in "
                           f"{READY_TIMEOUT_S:.0f} s: {_tail(self.err)}")

    def stop(self) -> dict:
        if self.proc is None:
            return {}
        res = _reap(self.proc)
        if res["rc"] not in (0, None) and not res["killed"]:
            # SIGINT is the normal way to end all of them; 130 means they died of it
            if res["rc"] not in (130, -2):
                res["stderr"] = _tail(self.err)
        return res


class MaceTracer(_Proc):
    name = "mace"

    def start(self, ctx: Ctx) -> None:
        self._spawn(ctx, [sys.executable, "-m", "mace", "trace", "--netns", ctx.ns_path,
                          "-q", "-f", "jsonl", "-o", "/dev/null"])
        # it prints nothing with -q: ready once every probe is open on every CPU (enabled
        # right after), and never before MACE_MIN_START_S
        self._wait_fds(len(ctx.probes) * ctx.ncpu, MACE_MIN_START_S)


class MaceXmitTracer(_Proc):
    """mace ending egress at the uplink's driver, MACE's end (--end-at-xmit): one sample
    more per round trip than the default, on the uplink's transmit."""
    name = "mace-xmit"

    def start(self, ctx: Ctx) -> None:
        self._spawn(ctx, [sys.executable, "-m", "mace", "trace", "--netns", ctx.ns_path,
                          "--end-at-xmit", "-q", "-f", "jsonl", "-o", "/dev/null"])
        self._wait_fds(len(ctx.xmit_probes) * ctx.ncpu, MACE_MIN_START_S)


class PerfTracer(_Proc):
    name = "perf"

    def start(self, ctx: Ctx) -> None:
        self.data = ctx.tmp / "perf.data"
        argv = ["perf", "record", "-a", "-q", "-B", "-o", str(self.data)]
        for p in ctx.probes:
            argv += ["-e", p.tracepoint]
            f = p.filter_text()
            if f:
                argv += ["--filter", f]
        self._spawn(ctx, argv)
        self._wait_fds(len(ctx.probes) * ctx.ncpu)

    def stop(self) -> dict:
        res = super().stop()
        try:
            res["data_bytes"] = self.data.stat().st_size
            self.data.unlink()
        except OSError:
            pass
        return res


class HitsTracer(_Proc):
    """perf stat counting mace's tracepoints on every CPU, without filters: each hit builds
    its record and counts, no sample is written.  Its counts are every hit of the run."""
    name = "hits"

    def start(self, ctx: Ctx) -> None:
        self.stat = ctx.tmp / "hits.csv"
        argv = ["perf", "stat", "-a", "-x", ",", "-o", str(self.stat)]
        tracepoints = dict.fromkeys(p.tracepoint for p in ctx.probes)
        for tp in tracepoints:
            argv += ["-e", tp]
        self._spawn(ctx, argv)
        self._wait_fds(len(tracepoints) * ctx.ncpu)

    def stop(self) -> dict:
        res = super().stop()
        res["hits"] = _stat_counts(self.stat)
        return res


def _stat_counts(path: Path) -> dict[str, int]:
    """Counts per event of a `perf stat -x ,` output file ({} if it has none)."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split(",")
        if len(f) > 2 and f[0].isdigit():
            out[f[2]] = int(f[0])
    return out


def bpftrace_script(veth: str, inner: str, uplink: str) -> str:
    """mace's correlation of its default segments, in the kernel: egress from the veth's
    netif_rx to the uplink's queue, ingress from the uplink's receive to the inner device's;
    an entry ends when its packet is dropped (kfree_skb), as in mace."""
    return f"""
tracepoint:net:netif_rx_entry
{{
  if (str(args->name) == "{veth}") {{
    @eg_t0[args->skbaddr] = nsecs;
  }}
}}

tracepoint:net:net_dev_queue
{{
  if (str(args->name) == "{uplink}") {{
    $t = @eg_t0[args->skbaddr];
    if ($t) {{
      @egress_ns = hist(nsecs - $t);
      delete(@eg_t0[args->skbaddr]);
    }}
  }}
}}

tracepoint:net:netif_receive_skb
{{
  $n = str(args->name);
  if ($n == "{uplink}") {{
    @in_t0[args->skbaddr] = nsecs;
  }} else if ($n == "{inner}") {{
    $t = @in_t0[args->skbaddr];
    if ($t) {{
      @ingress_ns = hist(nsecs - $t);
      delete(@in_t0[args->skbaddr]);
    }}
  }}
}}

tracepoint:skb:kfree_skb
{{
  delete(@eg_t0[args->skbaddr]);
  delete(@in_t0[args->skbaddr]);
}}

END
{{
  clear(@eg_t0);
  clear(@in_t0);
}}
"""


def _hist_count(text: str, name: str) -> int:
    """Sum of a bpftrace histogram's buckets as printed at exit."""
    total, inside = 0, False
    for line in text.splitlines():
        if line.startswith("@"):
            inside = line.startswith(f"@{name}:")
            continue
        if inside and line.startswith("[") and "|" in line:
            # "[1K, 2K)     123 |@@@@      |"
            head = line.split("|", 1)[0].split()
            if head and head[-1].isdigit():
                total += int(head[-1])
    return total


class BpftraceTracer(_Proc):
    name = "bpftrace"

    def start(self, ctx: Ctx) -> None:
        script = ctx.tmp / "perturbation.bt"
        script.write_text(bpftrace_script(ctx.veth, ctx.inner, ctx.uplink))
        self._spawn(ctx, ["bpftrace", str(script)])
        t0 = time.monotonic()
        while time.monotonic() - t0 < READY_TIMEOUT_S + 15:
            if "Attaching" in _tail(self.out, 4000):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpftrace exited {self.proc.returncode}: {_tail(self.err)}")
            time.sleep(0.02)
        raise RuntimeError(f"bpftrace printed no 'Attaching' line: {_tail(self.err)}")

    def stop(self) -> dict:
        res = super().stop()
        text = _tail(self.out, 100_000)
        res["egress_reports"] = _hist_count(text, "egress_ns")
        res["ingress_reports"] = _hist_count(text, "ingress_ns")
        return res


class FtraceTracer:
    """A tracefs instance with the probes' events and filters, drained by cat."""

    name = "ftrace"
    reader = True
    buffer_kb = 0             # the instance's default
    clock = ""                # the instance's default (local)

    def __init__(self):
        self.inst: Path | None = None
        self.cat: subprocess.Popen | None = None
        self.enabled: list[Path] = []

    def start(self, ctx: Ctx) -> None:
        inst = ctx.tracefs / "instances" / INSTANCE
        if inst.exists():           # left by an interrupted earlier run
            inst.rmdir()
        inst.mkdir()
        self.inst = inst
        if self.buffer_kb:
            (inst / "buffer_size_kb").write_text(f"{self.buffer_kb}\n")
        if self.clock:
            (inst / "trace_clock").write_text(f"{self.clock}\n")
        for p in ctx.probes:
            ev = inst / "events" / p.tracepoint.replace(":", "/")
            f = p.filter_text()
            if f:
                (ev / "filter").write_text(f + "\n")
        if self.reader:
            self._read(ctx, inst)
        for p in ctx.probes:
            en = inst / "events" / p.tracepoint.replace(":", "/") / "enable"
            en.write_text("1\n")
            self.enabled.append(en)

    def _read(self, ctx: Ctx, inst: Path) -> None:
        self.cat = subprocess.Popen(["cat", str(inst / "trace_pipe")], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ctx.pids.append(self.cat.pid)

    def pids(self) -> list[int]:
        return [self.cat.pid] if self.cat is not None else []

    def stop(self) -> dict:
        res: dict = {}
        for en in self.enabled:
            try:
                en.write_text("0\n")
            except OSError:
                pass
        if self.cat is not None:       # (the reader drains what is left first)
            r = _reap(self.cat, signal.SIGTERM, 5)
            res["cpu_s"] = r["cpu_s"]
        if self.inst is not None:
            res.update(_ftrace_stats(self.inst))
        if self.inst is not None:
            for _ in range(50):
                try:
                    self.inst.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)
            res["instance_removed"] = not self.inst.exists()
        return res


def _ftrace_stats(inst: Path) -> dict:
    """Events written and overrun (lost) over all CPUs of the instance's buffer."""
    written = overrun = entries = 0
    try:
        for d in (inst / "per_cpu").iterdir():
            for line in (d / "stats").read_text().splitlines():
                k, _, v = line.partition(":")
                v = v.strip()
                if k == "overrun" and v.isdigit():
                    overrun += int(v)
                elif k == "read events" and v.isdigit():
                    written += int(v)
                elif k == "entries" and v.isdigit():
                    entries += int(v)
    except OSError:
        return {}
    return {"read_events": written, "entries": entries, "overrun": overrun}


class FtraceNoReadTracer(FtraceTracer):
    """The ftrace configuration without `cat`: the events go into an 8 MiB ring per CPU that
    nobody reads, so no write ever wakes a reader."""
    name = "ftrace-noread"
    reader = False
    buffer_kb = 8192


RAW_READER = """
import glob, os, signal, sys, time
fds = [os.open(p, os.O_RDONLY | os.O_NONBLOCK)
       for p in sorted(glob.glob(sys.argv[1] + "/per_cpu/cpu*/trace_pipe_raw"))]
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
while True:
    last = bool(stop)          # a stop drains once more: what was written before it
    for fd in fds:
        while True:
            try:
                if not os.read(fd, 4096):
                    break
            except BlockingIOError:
                break
    if last:
        break
    time.sleep(float(sys.argv[2]))
"""


class FtraceRawTracer(FtraceTracer):
    """The ftrace configuration read the way a capture on ftrace's ring would read it: each
    CPU's trace_pipe_raw, binary pages, without blocking, every 50 ms (mace's poll timeout),
    on CLOCK_MONOTONIC (the clock mace orders by); nothing waits on the ring, so no write
    wakes a reader.  The pages are thrown away: decoding them is the reader's CPU, not the
    traced packets' time."""
    name = "ftrace-raw"
    buffer_kb = 1024
    clock = "mono"
    period_s = 0.05

    def _read(self, ctx: Ctx, inst: Path) -> None:
        self.cat = subprocess.Popen([sys.executable, "-c", RAW_READER, str(inst), str(self.period_s)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        ctx.pids.append(self.cat.pid)
        if self.cat.stdout.readline().strip() != "ready":
            raise RuntimeError("the trace_pipe_raw reader did not start")


TRACERS = {"none": NoTracer, "mace": MaceTracer, "mace-xmit": MaceXmitTracer, "ftrace": FtraceTracer, "perf": PerfTracer,
           "bpftrace": BpftraceTracer,
           "hits": HitsTracer, "ftrace-noread": FtraceNoReadTracer, "ftrace-raw": FtraceRawTracer}


# -- measurement ---------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _proc_cpu_s(pid: int) -> float | None:
    """user + sys CPU time of a live process (all its threads) so far."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _ping(ctx: Ctx, count: int, interval: float) -> dict:
    """The measured ping, from container 0.  Its output goes to a file so that, while it
    runs, the CPU it is on can be sampled (field 39 of /proc/PID/stat; nsenter execs it)."""
    from mace.demo import parse_ping

    tb = ctx.tb
    argv = ["ping", "-n", "-D", "-c", str(count), "-i", str(interval), tb.peer_ip]
    outp, errp = ctx.tmp / "ping.out", ctx.tmp / "ping.err"
    with open(outp, "wb") as o, open(errp, "wb") as e:
        p = tb.popen(tb.containers[0].ns, argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    on_cpu: dict[int, int] = {}
    deadline = time.monotonic() + count * interval * 4 + 10
    while p.poll() is None and time.monotonic() < deadline:
        f = _stat_fields(p.pid)
        if f is not None and len(f) > 36 and f[0] == "R":
            on_cpu[int(f[36])] = on_cpu.get(int(f[36]), 0) + 1
        time.sleep(0.02)
    if p.poll() is None:
        p.kill()
    p.wait(timeout=10)
    out, err = outp.read_text(errors="replace"), errp.read_text(errors="replace")
    rtts = [rtt for _, _, rtt in parse_ping(out)]
    res = {"sent": count, "received": len(rtts), "rc": p.returncode,
           "ping_on_cpu": {str(k): v for k, v in sorted(on_cpu.items())}}
    if rtts:
        s = sorted(rtts)
        cut = len(s) // 10
        res.update(median_ns=statistics.median(s), mean_ns=round(statistics.fmean(s), 1),
                   trimmed_mean_ns=round(statistics.fmean(s[cut:len(s) - cut] or s), 1),
                   p90_ns=s[min(len(s) - 1, round(0.9 * (len(s) - 1)))], min_ns=s[0])
    else:
        res["error"] = f"no replies (rc {p.returncode}): {err.strip()[-200:]}"
    return res


def _measure(ctx: Ctx, name: str, count: int, interval: float, t_origin: float,
             quiet: bool) -> dict:
    tracer = TRACERS[name]()
    res: dict = {}
    if quiet:
        res["busy_before"] = wait_quiet(QUIET_LIMIT_S, QUIET_BELOW)
    t_start = time.monotonic()
    try:
        tracer.start(ctx)
        res["ready_s"] = round(time.monotonic() - t_start, 3)
        time.sleep(SETTLE_S)
        res["t_s"] = round(time.monotonic() - t_origin, 2)
        s0 = cpu_sample()
        pids = tracer.pids()
        c0 = [_proc_cpu_s(pid) for pid in pids]
        res.update(_ping(ctx, count, interval))
        res["busy_during"] = busy_since(s0)
        c1 = [_proc_cpu_s(pid) for pid in pids]
        if pids and None not in c0 + c1:
            # the tracer's own CPU while the pings ran (the rest of cpu_s is start and stop)
            res["tracer_cpu_during_ping_s"] = round(sum(c1) - sum(c0), 3)
    except Exception as e:     # recorded for this run; the other runs go on
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            res["tracer"] = tracer.stop()
        except Exception as e:  # noqa: BLE001
            res.setdefault("error", f"stop: {type(e).__name__}: {e}")
    return res


def _start_floods(tb, load: int, seconds: int) -> list[subprocess.Popen]:
    return [tb.popen(c.ns, ["ping", "-n", "-q", "-f", "-w", str(seconds), tb.peer_ip],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for c in tb.containers[1:1 + load]]


def _stop_floods(floods: list[subprocess.Popen]) -> None:
    for f in floods:
        if f.poll() is None:
            f.kill()
    for f in floods:
        try:
            f.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _phase(load: int, prm: dict, configs: list[str], mount: TracefsMount, budget_s: float,
           pids: list[int]) -> dict:
    from mace.capture.tracefs import read_formats
    from mace.targets.netns import discover, resolve
    from mace.testing.testbed import Testbed

    rounds: list[dict] = []
    restarts = 0
    t_phase = time.monotonic()
    with Testbed(containers_n=1 + load, masquerade=True) as tb, \
            tempfile.TemporaryDirectory(prefix="mace-perturb-") as tmpd:
        # ARP, the neighbour entries and the first packet's conntrack are not the topic
        for c in tb.containers:
            tb.run(c.ns, ["ping", "-n", "-c", "2", "-i", "0.2", tb.peer_ip], timeout=10)
        plan = discover([resolve(tb.ns_path(tb.containers[0].ns))]).plan()
        # with the tracepoints' formats, as mace opens them (kfree_skb filtered by reason)
        formats = read_formats(list(dict.fromkeys(p.tracepoint for p in plan.probes())))
        probes = plan.probes(formats)
        ctx = Ctx(tb, probes, plan, mount.root, Path(tmpd), formats)
        flood_s = int(budget_s + 30)
        floods = _start_floods(tb, load, flood_s)
        try:
            if floods:
                time.sleep(0.5)
            t_origin = time.monotonic()
            round_s = None
            for r in range(prm["rounds"]):
                elapsed = time.monotonic() - t_phase
                if round_s is not None and elapsed + round_s > budget_s:
                    break               # the time budget ends the phase at a round boundary
                t_r = time.monotonic()
                order = configs[r % len(configs):] + configs[:r % len(configs)]
                runs = {}
                for name in order:
                    if floods and any(f.poll() is not None for f in floods):
                        _stop_floods(floods)          # keep the load constant
                        floods = _start_floods(tb, load, flood_s)
                        restarts += 1
                        time.sleep(0.5)
                    runs[name] = _measure(ctx, name, prm["count"], prm["interval"], t_origin,
                                          quiet=not floods)
                rounds.append({"round": r, "order": order, "runs": runs})
                round_s = max(round_s or 0.0, time.monotonic() - t_r)
        finally:
            _stop_floods(floods)
            pids.extend(ctx.pids)
    out = {"load": load, "containers": 1 + load, "rounds": rounds, "flood_restarts": restarts,
           "seconds": round(time.monotonic() - t_phase, 1),
           "devices": {"inner": plan.containers[0].inner, "veth": plan.containers[0].veth,
                       "bridge": plan.containers[0].bridge, "uplink": plan.uplink},
           "probes": [{"tracepoint": p.tracepoint, "filter": p.filter_text()} for p in probes]}
    out["added"] = _added(rounds, configs)
    return out


def _added(rounds: list[dict], configs: list[str]) -> dict:
    """Per configuration: the per-round differences to `none` and their median (µs)."""
    out = {}
    for name in configs:
        per, per_mean, rnd = [], [], []
        for rd in rounds:
            a, b = rd["runs"].get(name, {}), rd["runs"].get("none", {})
            if a.get("median_ns") is None or b.get("median_ns") is None:
                continue
            per.append((a["median_ns"] - b["median_ns"]) / 1000)
            per_mean.append((a["trimmed_mean_ns"] - b["trimmed_mean_ns"]) / 1000)
            rnd.append(rd["round"])
        medians = [rd["runs"].get(name, {}).get("median_ns") for rd in rounds]
        cpu = [rd["runs"].get(name, {}).get("tracer", {}).get("cpu_s") for rd in rounds]
        during = [rd["runs"].get(name, {}).get("tracer_cpu_during_ping_s") for rd in rounds]
        during = [c for c in during if c is not None]
        out[name] = {
            "rounds": rnd,
            "per_round_us": per,
            "median_us": statistics.median(per) if per else None,
            "min_us": min(per) if per else None,
            "max_us": max(per) if per else None,
            "trimmed_mean_added_us": round(statistics.median(per_mean), 3) if per_mean else None,
            "per_round_median_ns": medians,
            "cpu_s": cpu,
            "cpu_s_median": statistics.median([c for c in cpu if c is not None])
            if any(c is not None for c in cpu) else None,
            "cpu_during_ping_s_median": statistics.median(during) if during else None,
            "errors": [rd["runs"][name]["error"] for rd in rounds
                       if rd["runs"].get(name, {}).get("error")],
        }
    return out


def _main_cpu(run_: dict) -> int | None:
    """The CPU the ping was seen running on most often during the run."""
    on = run_.get("ping_on_cpu") or {}
    return int(max(on, key=on.get)) if on else None


def _by_cpu(phase: dict, name: str) -> dict[int, list[float]]:
    """Run medians (µs) of one configuration, grouped by the CPU its ping ran on."""
    out: dict[int, list[float]] = {}
    for rd in phase["rounds"]:
        r = rd["runs"].get(name, {})
        cpu = _main_cpu(r)
        if cpu is not None and r.get("median_ns") is not None:
            out.setdefault(cpu, []).append(r["median_ns"] / 1000)
    return out


def _blocker() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tracepoints, tracefs)"
    if shutil.which("ping") is None:
        return "needs ping (iputils-ping)"
    return None


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            kids.append(int(d))
    return kids


def run(quick: bool) -> dict:
    reason = _blocker()
    if reason:
        return {"skipped": reason}
    prm = _params(quick)
    configs = list(prm["configs"])
    skipped = {}
    if "perf" in configs and shutil.which("perf") is None:
        skipped["perf"] = "perf is not installed"
    if "bpftrace" in configs and shutil.which("bpftrace") is None:
        skipped["bpftrace"] = "bpftrace is not installed on this machine"
    configs = [c for c in configs if c not in skipped]
    pids: list[int] = []
    phases, errors = [], []
    t0 = time.monotonic()
    mount = TracefsMount()
    try:
        mount.__enter__()
        for i, load in enumerate(prm["loads"]):
            left = prm["budget_s"] - (time.monotonic() - t0)
            share = left / (len(prm["loads"]) - i)
            try:
                phases.append(_phase(load, prm, configs, mount, share, pids))
            except Exception as e:     # one broken phase must not hide the other
                errors.append(f"load {load}: {type(e).__name__}: {e}")
    finally:
        inst = mount.root / "instances" / INSTANCE
        instance_left = inst.exists()
        mount.close()
    left = [p for p in pids if _alive(p)]
    cleanup = {
        "tracer_processes_started": len(pids),
        "tracer_processes_left": left,
        "child_processes_left": _children(os.getpid()),
        "ftrace_instance_left": instance_left,
        "tracefs_mounted_by_benchmark": mount.was_mounted is False,
        "tracefs_mount_restored": mount.restored(),
    }
    cleanup["clean"] = (not left and not cleanup["child_processes_left"] and not instance_left
                        and cleanup["tracefs_mount_restored"])
    return {"params": {k: v for k, v in prm.items() if k != "configs"},
            "configs": configs, "skipped_configs": skipped, "phases": phases,
            "errors": errors, "cleanup": cleanup, "settle_s": SETTLE_S,
            "cpus": os.cpu_count()}


# -- presentation --------------------------------------------------------------------------------

def _fmt_us(x) -> str:
    return "-" if x is None else f"{x:+.1f} µs"


def _targets(phase: dict) -> dict:
    """mace vs the targets on this phase: {name: (met, margin µs)}; margin > 0 = missed by."""
    add = phase["added"]
    m = add.get("mace", {}).get("median_us")
    out = {}
    if m is None:
        return out
    out["mace"] = (m <= TARGET_US, m - TARGET_US)
    for other in ("ftrace", "bpftrace"):
        o = add.get(other, {}).get("median_us")
        if o is not None:
            out[other] = (m <= o, m - o)
    return out


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    phases = result.get("phases") or []
    if not phases:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, "perturbation not measured:\n"
                + str(result.get("skipped") or result.get("errors")), ha="center", va="center")
        save(fig, path)
        return
    configs = result["configs"]
    fig, axes = plt.subplots(len(phases), 2, figsize=(14, 4.6 * len(phases)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.5]})
    for row, ph in zip(axes, phases, strict=True):
        a1, a2 = row
        tracers = [c for c in configs if c != "none"]
        add = ph["added"]
        for i, name in enumerate(tracers):
            d = add.get(name, {})
            if d.get("median_us") is None:
                a1.text(i, 0, "no data", ha="center", fontsize=8)
                continue
            a1.bar(i, d["median_us"], width=0.6, color=COLORS.get(name), alpha=0.35)
            n = len(d["per_round_us"])
            xs = [i - 0.18 + 0.36 * k / max(1, n - 1) for k in range(n)]
            a1.scatter(xs, d["per_round_us"], s=18, color=COLORS.get(name), zorder=3)
            cpu = d.get("cpu_s_median")
            label = f"{d['median_us']:+.1f} µs"
            if cpu is not None:
                label += f"\nCPU {cpu:.2f} s/run"
            top = max(d["per_round_us"] + [d["median_us"]])
            a1.annotate(label, (i, top), xytext=(0, 4), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
        for name in result.get("skipped_configs", {}):
            tracers.append(name)
            a1.text(len(tracers) - 1, 0, "skipped", ha="center", fontsize=8, rotation=90)
        a1.axhline(0, color="black", lw=0.7)
        a1.axhline(TARGET_US, color="tab:red", ls="--", lw=1)
        a1.text(-0.55, TARGET_US, "mace target 3 µs", color="tab:red",
                fontsize=7.5, va="bottom", ha="left")
        a1.set_xticks(range(len(tracers)))
        a1.set_xticklabels(tracers)
        a1.set_xlim(-0.6, len(tracers) - 0.4)
        lo, hi = a1.get_ylim()
        a1.set_ylim(lo, hi + (hi - lo) * 0.12)
        a1.set_ylabel("added median RTT vs none, same round (µs)")
        a1.set_title(f"load {ph['load']}: added RTT per round (points), median over "
                     f"{len(ph['rounds'])} rounds (bar)", fontsize=9.5)
        a1.grid(axis="y", alpha=0.3)
        for name in configs:
            pts = [(rd["runs"][name]["t_s"], rd["runs"][name]["median_ns"] / 1000)
                   for rd in ph["rounds"]
                   if rd["runs"].get(name, {}).get("median_ns") is not None]
            if pts:
                a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, lw=0.8,
                        color=COLORS.get(name), label=name)
        a2.set_xlabel("time since the first round (s)")
        a2.set_ylabel("median RTT of the run (µs)")
        a2.set_title(f"load {ph['load']}: per-run median RTT over time "
                     f"(ping -c {result['params']['count']} -i {result['params']['interval']}), "
                     "drift", fontsize=9.5)
        a2.legend(fontsize=8, ncol=len(configs))
        a2.grid(alpha=0.3)
    save(fig, path)


def summary(result: dict) -> list[dict]:
    if result.get("skipped"):
        return [{"metric": "perturbation", "value": f"skipped: {result['skipped']}",
                 "target": "", "met": None}]
    rows = []
    for ph in result.get("phases", []):
        add = ph["added"]
        tg = _targets(ph)
        mace = add.get("mace", {}).get("median_us")
        for name in [c for c in result["configs"] if c != "none"] + \
                list(result.get("skipped_configs", {})):
            metric = f"added median RTT, {name}, load {ph['load']}"
            if name in result.get("skipped_configs", {}):
                rows.append({"metric": metric, "value": "skipped: " + result["skipped_configs"][name],
                             "target": "mace <= this" if name in ("ftrace", "bpftrace") else "",
                             "met": None})
                continue
            d = add.get(name, {})
            if d.get("median_us") is None:
                rows.append({"metric": metric, "value": "no data: " + "; ".join(d.get("errors", [])[:1]),
                             "target": "", "met": False if name == "mace" else None})
                continue
            value = (f"{_fmt_us(d['median_us'])} (rounds {_fmt_us(d['min_us'])} .. "
                     f"{_fmt_us(d['max_us'])})")
            if d.get("cpu_s_median") is not None and name != "none":
                value += f"; tracer CPU {d['cpu_s_median']:.2f} s/run"
            if name == "mace":
                met, margin = tg["mace"]
                rows.append({"metric": metric, "value": value + ("" if met else
                             f"; missed by {margin:.1f} µs"), "target": "<= 3 µs", "met": met})
            elif name in ("ftrace", "bpftrace"):
                met = tg[name][0] if name in tg else None
                if mace is not None and met is False:
                    value += f"; mace is {tg[name][1]:.1f} µs above it"
                rows.append({"metric": metric, "value": value, "target": "mace <= this",
                             "met": met})
            else:
                rows.append({"metric": metric, "value": value, "target": "", "met": None})
    for e in result.get("errors", []):
        rows.append({"metric": "phase", "value": f"failed: {e}", "target": "", "met": False})
    cl = result.get("cleanup", {})
    if cl:
        rows.append({"metric": "tracers, ftrace instance and tracefs mount cleaned up",
                     "value": "yes" if cl.get("clean") else f"NO: {cl}", "target": "yes",
                     "met": bool(cl.get("clean"))})
    return rows


def hits_per_round_trip(ph: dict, count: int) -> dict[str, float]:
    """Median over the `hits` runs of each tracepoint's hits per ping round trip (every hit of
    the run over the pings sent: at load 0 the pings are all the traffic there is)."""
    per: dict[str, list[float]] = {}
    for rd in ph["rounds"]:
        run_ = rd["runs"].get("hits", {})
        sent = run_.get("sent") or count
        for tp, n in (run_.get("tracer", {}).get("hits") or {}).items():
            per.setdefault(tp, []).append(n / sent)
    return {tp: statistics.median(v) for tp, v in per.items()}


def _decomposition(ph: dict, count: int) -> str | None:
    """Where mace's added RTT goes, from the hits and ftrace-noread configurations."""
    add = ph["added"]
    mace, hits = add.get("mace", {}).get("median_us"), add.get("hits", {}).get("median_us")
    if mace is None or hits is None:
        return None
    text = (f"Load {ph['load']}, where mace's cost goes: its tracepoints' hits alone (built and "
            f"counted, nothing written: `hits`) add {_fmt_us(hits)}, mace {_fmt_us(mace)}; the "
            f"difference, {mace - hits:+.1f} µs, is what writing its samples to the rings costs")
    noread = add.get("ftrace-noread", {}).get("median_us")
    if noread is not None:
        text += (f"; ftrace writing the same events into its own ring, with no reader, adds "
                 f"{_fmt_us(noread)}")
    raw = add.get("ftrace-raw", {}).get("median_us")
    if raw is not None:
        text += (f"; the same ring read as a capture on it would read it (each CPU's "
                 f"trace_pipe_raw, every 50 ms, on CLOCK_MONOTONIC, pages not decoded) adds "
                 f"{_fmt_us(raw)}")
    per = hits_per_round_trip(ph, count) if ph["load"] == 0 else {}
    if per:
        text += (f". Hits per ping round trip: {sum(per.values()):.1f} in all ("
                 + ", ".join(f"{tp} {n:.1f}" for tp, n in sorted(per.items())) + ")")
    return text + "."


def notes(result: dict) -> list[str]:
    if result.get("skipped"):
        return []
    p = result["params"]
    out = [
        f"Method: per load level a fresh `Testbed(containers_n=1 + load, masquerade=True)`; 2 "
        "pings from every container first (ARP, neighbour entries, conntrack). Then "
        f"{p['rounds']} rounds; in each, every configuration ({', '.join(result['configs'])}) "
        "once, in a rotated order (round r starts at configuration r mod "
        f"{len(result['configs'])}): start the tracer, wait until it is ready, sleep "
        f"{result['settle_s']} s (also for `none`), run `ping -n -D -c {p['count']} -i "
        f"{p['interval']}` from container 0 to the peer, stop the tracer. Each run's RTT is the "
        "median of its replies (`mace.demo.parse_ping`); a configuration's added RTT is the "
        "median over rounds of (its median - the `none` median of the same round), the "
        "spread is the min..max of those per-round differences. ping prints RTTs in µs steps, "
        "so medians (and differences) are quantized to 0.5-1 µs; the JSON also has the "
        "difference of 10%-trimmed means (`trimmed_mean_added_us`), which is not.",
        ("Load: with load L > 0, containers 1..L each run `ping -n -q -f -w <phase budget>` "
         "to the peer for the whole phase (restarted if one ends early: "
         + ", ".join(f"load {ph['load']}: {ph['flood_restarts']} restarts"
                     for ph in result["phases"] if ph["load"])
         + "), so every configuration and round sees the same flood. The floods' receives on "
         "their own eth0 and their packets on the uplink pass mace's in-kernel filter (inner "
         "names are ambiguous), so every tracer also sees some of the floods' events."
         if any(ph["load"] for ph in result["phases"]) else
         "Load: none in this run (loads measured: "
         + ", ".join(str(x) for x in p["loads"]) + "; the full run adds load 2: two co-located "
         "containers flooding the peer with `ping -f`, and load 4)."),
        "Same events for every tracer: the probes of `discover([resolve(ns)]).plan().probes(formats)` "
        "for container 0: "
        + "; ".join(f"{q['tracepoint']}" + (f" [{q['filter']}]" if q["filter"] else " [no filter]")
                    for q in (result["phases"][0]["probes"] if result["phases"] else []))
        + ". mace: the real CLI (`python -m mace trace --netns PATH -q -f jsonl -o /dev/null`, "
        "ready once it holds one perf event per probe and CPU, and at least "
        f"{MACE_MIN_START_S} s after its start), stopped with SIGINT; its CPU time is the "
        "user+sys of the process from os.wait4. ftrace: a tracefs instance "
        f"(instances/{INSTANCE}) with the same events enabled and each probe's "
        "`Probe.filter_text()` written to the event's `filter` file, recording into the "
        "instance's own kernel buffer (default size) while `cat trace_pipe > /dev/null` reads "
        "it (its CPU time is cat's; the kernel's formatting happens in cat's read calls); "
        "removed after each run. perf: `perf record -a -q -B -o TMP -e TP --filter F ...` "
        "for the same probes (file deleted after each run), stopped with SIGINT. bpftrace: a "
        "script correlating mace's default segments in the kernel (maps keyed by skbaddr; "
        "egress from netif_rx_entry of the host-side veth to net_dev_queue of the uplink, "
        "ingress from netif_receive_skb of the uplink to netif_receive_skb of the inner "
        "device, names compared with str(args->name); kfree_skb deletes the entry, as mace "
        "ends one; histograms of the deltas), started and waited for until it prints "
        "'Attaching'; its program runs on every event of these tracepoints, as BPF cannot use "
        "the ftrace filters. mace-xmit: mace with `--end-at-xmit` (one sample more per round "
        "trip, the uplink's transmit). ftrace-noread: the ftrace instance with an 8 MiB ring "
        "per CPU and no reader. ftrace-raw: the ftrace instance on CLOCK_MONOTONIC (`mono`, "
        "the clock mace orders by) with a 1 MiB ring per CPU, drained by a Python process "
        "reading each CPU's `trace_pipe_raw` without blocking every 50 ms (mace's poll "
        "timeout) and throwing the pages away: a lower bound for a capture on ftrace's ring, "
        "which would also decode and correlate them.",
    ]
    if result.get("skipped_configs"):
        out.append("Not measured here: " + "; ".join(f"{k}: {v}" for k, v in
                                                     result["skipped_configs"].items()) + ".")
    mount = result.get("cleanup", {})
    out.append("tracefs: " + ("not mounted on this machine; the benchmark mounted it at "
                              "/sys/kernel/tracing for the run (perf and bpftrace need it too) "
                              "and unmounted it afterwards"
                              if mount.get("tracefs_mounted_by_benchmark") else
                              "already mounted; left as it was")
               + ". Cleanup check after the run: "
               + (f"all {mount.get('tracer_processes_started', 0)} tracer processes reaped, no "
                  "child process left, no ftrace instance left, mount table as before."
                  if mount.get("clean") else f"NOT clean: {mount}"))
    for ph in result.get("phases", []):
        tg = _targets(ph)
        add = ph["added"]
        parts = []
        if "mace" in tg:
            met, margin = tg["mace"]
            parts.append(f"mace {_fmt_us(add['mace']['median_us'])} vs <= 3 µs: "
                         + ("met" if met else f"missed by {margin:.1f} µs"))
        for o in ("ftrace", "bpftrace"):
            if o in tg:
                met, margin = tg[o]
                parts.append(f"vs {o} {_fmt_us(add[o]['median_us'])}: "
                             + ("met" if met else f"mace above it by {margin:.1f} µs"))
        cpu = add.get("mace", {}).get("cpu_s") or []
        cpu = [c for c in cpu if c is not None]
        trimmed = ", ".join(f"{n} {add[n]['trimmed_mean_added_us']:+.2f}"
                            for n in result["configs"] if n != "none"
                            and add.get(n, {}).get("trimmed_mean_added_us") is not None)
        base = [rd["runs"]["none"]["median_ns"] / 1000 for rd in ph["rounds"]
                if rd["runs"].get("none", {}).get("median_ns") is not None]
        out.append(
            f"Load {ph['load']} ({len(ph['rounds'])} rounds, {ph['seconds']} s): "
            + "; ".join(parts)
            + (f". Baseline (none) median RTT {min(base):.0f}-{max(base):.0f} µs over the rounds"
               if base else "")
            + (f"; mace's CPU per run (start, {p['count']} pings, stop) "
               f"{min(cpu):.2f}-{max(cpu):.2f} s" if cpu else "")
            + (f"; added RTT from 10%-trimmed means (µs): {trimmed}" if trimmed else "") + ".")
    for ph in result.get("phases", []):
        line = _decomposition(ph, p["count"])
        if line:
            out.append(line)
    for ph in result.get("phases", []):
        bb = [rd["runs"]["none"].get("busy_during") for rd in ph["rounds"]
              if rd["runs"].get("none", {}).get("busy_during") is not None]
        waits = [r.get("busy_before") for rd in ph["rounds"] for r in rd["runs"].values()
                 if r.get("busy_before") is not None]
        if bb:
            out.append(
                f"Load {ph['load']}: share of both CPUs busy during the `none` pings (the "
                f"ping itself, the load, and anything else on the machine) "
                f"{min(bb) * 100:.0f}-{max(bb) * 100:.0f}% (median "
                f"{statistics.median(bb) * 100:.0f}%)"
                + (f"; before each run the benchmark waited up to {QUIET_LIMIT_S} s for less "
                   f"than {QUIET_BELOW * 100:.0f}% busy, and "
                   f"{sum(w >= QUIET_BELOW for w in waits)} of {len(waits)} runs started "
                   "without getting it" if waits else "")
                + ". Other work on the VM during a run shows up as round-to-round spread; "
                "the interleaved, rotated order spreads it over all configurations.")
    busy_ping = [rd["runs"]["none"].get("busy_during") for ph in result.get("phases", [])
                 if ph["load"] == 0 for rd in ph["rounds"]
                 if rd["runs"].get("none", {}).get("busy_during") is not None]
    out.append(
        f"At -i {p['interval']} iputils ping does not sleep between probes: it spins (about "
        "one CPU busy"
        + (f"; {statistics.median(busy_ping) * 100:.0f}% of the 2 CPUs during the `none` runs at "
           "load 0" if busy_ping else "")
        + "), so its RTTs carry no wake-up latency of its own, and it leaves the tracers one CPU.")
    for ph in result.get("phases", []):
        parts = []
        for name in result["configs"]:
            g = _by_cpu(ph, name)
            if g:
                parts.append(f"{name} " + ", ".join(
                    f"CPU {c}: {statistics.median(v):.0f} ({len(v)})" for c, v in sorted(g.items())))
        if parts:
            out.append(
                f"Load {ph['load']}: median of the run medians (µs) by the CPU the ping ran on "
                "(number of runs): " + "; ".join(parts) + ". Which CPU the scheduler puts the "
                "ping on moves its RTT by several µs or more (see `none`); the benchmark does "
                "not pin it (the command is the plain ping), so placement is a large part of "
                "the per-round spread, and the rotation and the median over rounds are what "
                "keep it from favouring one configuration.")
    cpu_rows = []
    for ph in result.get("phases", []):
        for name in result["configs"]:
            d = ph["added"].get(name, {})
            if d.get("cpu_s_median") is not None:
                cpu_rows.append(f"{name} {d['cpu_s_median']:.2f} s"
                                + (f" ({d['cpu_during_ping_s_median']:.2f} s of it during the pings)"
                                   if d.get("cpu_during_ping_s_median") is not None else "")
                                + f" at load {ph['load']}")
    if cpu_rows:
        out.append("Tracer CPU time per run (median; user + sys of the process from os.wait4, "
                   "start to exit; for ftrace only the reading cat, as the kernel does the "
                   "recording in the traced context; during the pings from /proc/PID/stat, "
                   "10 ms ticks): " + "; ".join(cpu_rows) + ".")
    out.append("On this VM CPU 1 silently drops some tracepoint samples taken in interrupt "
               "context (see the correlate benchmark); that costs reports, not RTT, so it does "
               "not bear on the perturbation measured here.")
    for e in result.get("errors", []):
        out.append(f"Phase error: {e}")
    return out
