#!/bin/busybox sh
# tests/vm/init.sh: /init of the `cargo xtask vmtest` guests. It mounts what the agent needs,
# starts the test services and the agent, drives requests, and writes everything the host
# asserts on to the data port (/dev/ttyS1) in sections; it decides nothing itself. The host
# writes /vmtest/env (socket hook set, Go versions, expected span counts). Every step has its
# own time limit, and the guest powers off at the end whatever happened.
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /run
/bin/busybox --install -s /bin
export PATH=/bin:/zt HOME=/root NO_COLOR=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
ip link set lo up
. /vmtest/env

D=/dev/ttyS1
stty -F $D raw -echo 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
emit() { echo "@@ZT $*" > $D; }
# send NAME FILE [RC]: a section holding FILE's text.
send() {
	emit "BEGIN $1"
	[ -f "$2" ] && cat "$2" > $D
	echo > $D
	emit "END $1 ${3:-0}"
}
# send64 NAME FILE: a section holding FILE in base64 (binary files).
send64() {
	emit "BEGIN $1"
	[ -f "$2" ] && base64 "$2" > $D
	emit "END $1 0"
}
emit "BOOT $(uname -r) $(up)"
for f in /sys/kernel/btf/vmlinux /sys/kernel/security/lockdown; do
	[ -e $f ] && emit "HAVE $f" || emit "LACK $f"
done

# listening PORT: whether something listens on 127.0.0.1:PORT (from /proc/net/tcp).
listening() { grep -qi ":$(printf '%04X' "$1") 00000000:0000 0A" /proc/net/tcp; }
wait_port() {
	n=0
	while ! listening "$1"; do
		n=$((n + 1))
		[ $n -gt 300 ] && { echo "port $1 never listened" >> /tmp/guest.log; return 1; }
		sleep 0.1
	done
}
# serve NAME PORT CMD...: starts a service named NAME (OTEL_SERVICE_NAME) in the
# background and waits for its port; its pid goes into PID_NAME.
serve() {
	name=$1 port=$2
	shift 2
	OTEL_SERVICE_NAME=$name "$@" > /tmp/$name.log 2>&1 &
	eval "PID_$(echo $name | tr - _)=$!"
	wait_port "$port"
}
pid_of() { eval "echo \$PID_$(echo $1 | tr - _)"; }
# get PORT PATH: one request (busybox wget, Connection: close, not traced); prints
# "PATH STATUS BODY".
get() {
	body=$(timeout 30 wget -q -S -O - "http://127.0.0.1:$1$2" 2> /tmp/wget.err)
	st=$(grep -o 'HTTP/1.[01] [0-9]*' /tmp/wget.err | tail -1 | cut -d' ' -f2)
	echo "$2 ${st:-none} $body"
}
# agent NAME SUBCOMMAND ARGS...: starts the agent on every pid in $PIDS and waits until it
# says it traces each of them (or exits, or 60 s pass); reports the time it took.
agent() {
	name=$1
	shift
	args=""
	for p in $PIDS; do args="$args --pid $p"; done
	t0=$(up) w0=$(date +%s)
	rec=""
	[ -n "$RECORD" ] && rec="--record /tmp/$name.rec"
	ZEROTRACE_LOG="${ZEROTRACE_LOG:-info},zerotrace::probes=debug" zerotrace "$@" --socket-hooks "$HOOKS" --stats-file /tmp/$name.stats $rec $args > /tmp/$name.out 2> /tmp/$name.err &
	AGENT=$!
	n=0
	while :; do
		ready=1
		for p in $PIDS; do grep -q "tracing pid=$p " /tmp/$name.err || ready=0; done
		[ $ready = 1 ] && break
		kill -0 $AGENT 2>/dev/null || break
		n=$((n + 1))
		[ $n -gt 600 ] && break
		sleep 0.1
	done
	emit "READY $name $t0 $(up) $ready $w0"
	[ $ready = 1 ]
}
# stop_agent NAME EXPECTED: waits until the agent printed EXPECTED spans (or no new one came
# for 6 s, at most 60 s), then SIGINT (it flushes and exits), SIGKILL after 40 s more.
stop_agent() {
	last=-1 still=0 n=0
	while [ $n -lt 600 ]; do
		c=$(grep -c '"trace_id"' /tmp/$1.out)
		[ "$c" -ge "$2" ] && break
		if [ "$c" = "$last" ]; then still=$((still + 1)); else still=0; fi
		[ $still -gt 60 ] && break
		last=$c n=$((n + 1))
		sleep 0.1
	done
	kill -INT $AGENT 2>/dev/null
	n=0
	while kill -0 $AGENT 2>/dev/null && [ $n -lt 400 ]; do n=$((n + 1)); sleep 0.1; done
	kill -KILL $AGENT 2>/dev/null
	wait $AGENT
	rc=$?
	send $1.out /tmp/$1.out
	send $1.err /tmp/$1.err $rc
	send $1.stats /tmp/$1.stats
	[ -n "$RECORD" ] && send64 $1.rec /tmp/$1.rec
}
finish() {
	send guest.log /tmp/guest.log
	for f in /tmp/*.log; do
		case $f in /tmp/guest.log) ;; *) send "svc:${f#/tmp/}" "$f" ;; esac
	done
	emit "DONE $(up)"
	sync
	poweroff -f
}

# doctor: what this kernel allows, and every kernel program through its verifier.
timeout 300 zerotrace doctor --programs > /tmp/doctor.txt 2>&1
send doctor /tmp/doctor.txt $?

# Run 1: the Go span trees (oldest and newest Go, a front calling a downstream) and the
# Rust service over HTTP/1 and gRPC, one agent (`tail --json`) for all of them.
for v in old new; do
	eval "go=\$GO_$(echo $v | tr a-z A-Z)"
	base=$([ $v = old ] && echo 18000 || echo 18010)
	serve go-$v-down $((base + 1)) causal-go$go 127.0.0.1:$((base + 1))
	serve go-$v-front $((base + 2)) causal-go$go 127.0.0.1:$((base + 2)) http://127.0.0.1:$((base + 1))
done
serve rust-leaf 18021 rust-svc 127.0.0.1:18021
serve rust-front 18022 rust-svc 127.0.0.1:18022 http://127.0.0.1:18021
serve rust-grpc 18023 rust-svc grpc 127.0.0.1:18023
OTEL_SERVICE_NAME=rust-get rust-svc get http://127.0.0.1:18022/chain/k 3 /tmp/go-get > /tmp/rust-get.log 2>&1 &
PID_rust_get=$!
OTEL_SERVICE_NAME=rust-grpc-call rust-svc grpc-call http://127.0.0.1:18023 unary 3 1 /tmp/go-grpc > /tmp/rust-grpc-call.log 2>&1 &
PID_rust_grpc_call=$!
PIDS=""
for s in go-old-down go-old-front go-new-down go-new-front rust-leaf rust-front rust-grpc rust-get rust-grpc-call; do
	PIDS="$PIDS $(pid_of $s)"
	emit "PID $s $(pid_of $s)"
done
# Program run counts for the hook set's cost (the "socket program runs" row).
echo 1 > /proc/sys/kernel/bpf_stats_enabled
if agent trace tail --json; then
	for v in old new; do
		base=$([ $v = old ] && echo 18002 || echo 18012)
		for p in /sync/1 /fanout/2 /nested/3 /unbuffered/4 /buffered/5 /select/6 /fail/7 /err5xx/8; do
			get $base $p >> /tmp/go-$v.responses
		done
		send go-$v.responses /tmp/go-$v.responses
	done
	touch /tmp/go-get /tmp/go-grpc
	timeout 60 sh -c "while kill -0 $PID_rust_get 2>/dev/null || kill -0 $PID_rust_grpc_call 2>/dev/null; do sleep 0.1; done"
	stop_agent trace "$TRACE_SPANS"
else
	send trace.err /tmp/trace.err 1
fi
kill -KILL $PIDS 2>/dev/null

# Run 2: --inject-traceparent=on, A -> B -> C per Go version; C answers with the traceparent
# it received on the wire, which comes back to the client through B and A.
PIDS=""
for v in old new; do
	eval "go=\$GO_$(echo $v | tr a-z A-Z)"
	base=$([ $v = old ] && echo 18030 || echo 18040)
	serve inject-$v-c $((base + 1)) causal-go$go 127.0.0.1:$((base + 1))
	serve inject-$v-b $((base + 2)) causal-go$go 127.0.0.1:$((base + 2)) http://127.0.0.1:$((base + 1))
	serve inject-$v-a $((base + 3)) causal-go$go 127.0.0.1:$((base + 3)) http://127.0.0.1:$((base + 2))
	for s in a b c; do
		PIDS="$PIDS $(pid_of inject-$v-$s)"
		emit "PID inject-$v-$s $(pid_of inject-$v-$s)"
	done
done
if agent inject tail --json --inject-traceparent=on; then
	get 18033 /chain/1 >> /tmp/inject.responses
	get 18043 /chain/1 >> /tmp/inject.responses
	send inject.responses /tmp/inject.responses
	stop_agent inject "$INJECT_SPANS"
else
	send inject.err /tmp/inject.err 1
fi
kill -KILL $PIDS 2>/dev/null

# Run 3: a CPU profile of a Rust release binary without frame pointers. The burner is
# stopped while the agent starts (both would share the one CPU) and continued once the agent
# traces it: the profile's 4 s start there.
rust-svc burn 60 > /tmp/burn.log 2>&1 &
BURN=$!
n=0
while ! grep -q burning /tmp/burn.log && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
kill -STOP $BURN
PIDS=$BURN
emit "PID burn $BURN"
agent profile profile --duration 4s --frequency 99 -o /tmp/cpu.pb.gz
kill -CONT $BURN
n=0
while kill -0 $AGENT 2>/dev/null && [ $n -lt 600 ]; do n=$((n + 1)); sleep 0.1; done
kill -KILL $AGENT 2>/dev/null
wait $AGENT
rc=$?
kill -KILL $BURN 2>/dev/null
send profile.err /tmp/profile.err $rc
send64 profile.pb.gz /tmp/cpu.pb.gz

finish
