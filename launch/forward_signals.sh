# Sourced by the launch scripts. `forward_signals CMD ...` runs CMD (DeepSpeed's runner) and returns its status.
# The runner passes SIGTERM/SIGINT on to the ranks only when it launches them over ssh: here it runs in a process
# group of its own and a signal to the calling script goes to that whole group, so every rank saves its stop
# checkpoint.
forward_signals() {
  set -m
  "$@" &
  _runner=$!
  trap 'kill -TERM -- "-$_runner" 2>/dev/null || true' TERM INT
  local status
  while :; do
    status=0
    wait "$_runner" || status=$?
    kill -0 "$_runner" 2>/dev/null || break  # still running: a trapped signal interrupted the wait
  done
  return "$status"
}
