# shellcheck shell=bash
# Shared launch code for slurm/train.sbatch and slurm/sweep-array.sbatch (sourced, not run).
#
#   dga_launch ARGS...
#
# runs, from the batch script (on the allocation's first node),
#
#   srun --nodes N --ntasks N --ntasks-per-node=1 \
#     torchrun --nnodes N --nproc_per_node P --rdzv_backend c10d \
#              --rdzv_endpoint HEAD:PORT --rdzv_id $SLURM_JOB_ID -m dist_gradalign train ARGS...
#
# i.e. one torchrun agent per node, each starting P ranks; the agents meet at a c10d
# rendezvous hosted on the first node of the allocation. It returns srun's exit status.
#
# Environment (all optional; sbatch exports the submitting shell's environment by default):
#   NPROC_PER_NODE        ranks per node (= GPUs per node). Default: $SLURM_GPUS_ON_NODE when
#                         the job has GPUs, else 1.
#   MASTER_ADDR           rendezvous host. Default: the first node of `scontrol show hostnames
#                         $SLURM_JOB_NODELIST` (its Slurm NodeAddr if the name does not resolve).
#   MASTER_PORT           rendezvous port. Default: 29500 + SLURM_JOB_ID % 1000, so jobs (and
#                         array tasks) sharing a node do not clash.
#   DIST_GRADALIGN_VENV   virtualenv to activate. Default: $SLURM_SUBMIT_DIR/.venv; when it does
#                         not exist, the `python`/`torchrun` already on PATH are used (conda,
#                         modules, a container, ...).
#   OMP_NUM_THREADS       default: CPUs per task / NPROC_PER_NODE, at least 1.
#   TORCH_NCCL_ASYNC_ERROR_HANDLING (default 1), NCCL_DEBUG (default WARN): exported for NCCL.
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: not set here; set them yourself if NCCL picks the
#                         wrong network (e.g. NCCL_SOCKET_IFNAME=ib0 or =^lo,docker).
#   DGA_SRUN_ARGS         extra srun arguments (word-split), e.g. "--cpu-bind=none".
#   DGA_TORCHRUN_ARGS     extra torchrun arguments (word-split), e.g. "--max_restarts 1".

dga_log() { echo "[dist-gradalign/slurm] $*"; }
dga_die() { echo "[dist-gradalign/slurm] error: $*" >&2; return 1; }

dga_is_uint() { [[ "${1:-}" =~ ^[0-9]+$ ]]; }

# The Python environment: the venv if there is one, else whatever is on PATH.
dga_activate_env() {
  local venv="${DIST_GRADALIGN_VENV:-${SLURM_SUBMIT_DIR:-$PWD}/.venv}"
  if [ -f "$venv/bin/activate" ]; then
    # shellcheck disable=SC1091
    . "$venv/bin/activate"
    dga_log "python environment: $venv"
  else
    dga_log "python environment: PATH ($venv has no bin/activate)"
  fi
  command -v torchrun >/dev/null || dga_die "torchrun is not on PATH (activate an environment with torch, or set DIST_GRADALIGN_VENV)"
}

dga_signal_step() {  # SIGTERM to all processes of this job's running training step(s)
  local steps
  steps="$(squeue -h -s -j "$SLURM_JOB_ID" -o %i 2>/dev/null | grep -E '\.[0-9]+$')"
  [ -n "$steps" ] || steps="${SLURM_JOB_ID}.0"
  for step in $steps; do scancel --signal=TERM "$step" || true; done
}

dga_launch() {
  [ -n "${SLURM_JOB_ID:-}" ] || { dga_die "not inside a Slurm job: submit this script with sbatch"; return 1; }
  dga_activate_env || return 1

  # Ranks per node: one per GPU. SLURM_GPUS_ON_NODE is set when the job requested GPUs
  # (--gpus-per-node, --gres=gpu:N, ...).
  local nproc="${NPROC_PER_NODE:-}"
  if [ -z "$nproc" ]; then
    if dga_is_uint "${SLURM_GPUS_ON_NODE:-}" && [ "${SLURM_GPUS_ON_NODE}" -gt 0 ]; then
      nproc="$SLURM_GPUS_ON_NODE"
    else
      nproc=1
    fi
  fi
  if ! dga_is_uint "$nproc" || [ "$nproc" -lt 1 ]; then
    dga_die "NPROC_PER_NODE must be a positive integer, got '$nproc'"; return 1
  fi
  export NPROC_PER_NODE="$nproc"

  local nnodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"

  # Rendezvous endpoint: the allocation's first node. The batch script runs there, and so
  # does the torchrun agent that hosts the c10d store.
  local head addr
  head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
  [ -n "$head" ] || { dga_die "cannot expand SLURM_JOB_NODELIST='${SLURM_JOB_NODELIST:-}'"; return 1; }
  addr="${MASTER_ADDR:-}"
  if [ -z "$addr" ]; then
    addr="$head"
    if ! getent hosts "$head" >/dev/null 2>&1; then
      # The node name does not resolve: use the address Slurm itself reaches the node at.
      local nodeaddr
      nodeaddr="$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)"
      [ -n "$nodeaddr" ] && addr="$nodeaddr"
    fi
  fi
  local port="${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}"
  export MASTER_ADDR="$addr" MASTER_PORT="$port"

  # NCCL (ignored on CPU/gloo). Async error handling turns a hung collective after a rank
  # failure into an error, so the job ends instead of idling until its time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

  # CPU threads per rank. With --ntasks-per-node=1, a task's CPUs are the node's CPUs for this job.
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    local cpus="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}"
    dga_is_uint "$cpus" || cpus=1
    local threads=$((cpus / nproc))
    [ "$threads" -ge 1 ] || threads=1
    export OMP_NUM_THREADS="$threads"
  fi
  # Slurm 22.05-23.02 steps do not inherit sbatch's --cpus-per-task; pass it on explicitly so a
  # CPU-bound step is not confined to one core.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
  fi

  dga_log "job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)}: $nnodes node(s) [$SLURM_JOB_NODELIST] x $nproc rank(s), rendezvous $addr:$port, OMP_NUM_THREADS=$OMP_NUM_THREADS"
  dga_log "train args: $*"

  local -a srun_extra=() torchrun_extra=()
  # shellcheck disable=SC2206
  [ -n "${DGA_SRUN_ARGS:-}" ] && srun_extra=(${DGA_SRUN_ARGS})
  # shellcheck disable=SC2206
  [ -n "${DGA_TORCHRUN_ARGS:-}" ] && torchrun_extra=(${DGA_TORCHRUN_ARGS})

  # One torchrun per node (explicit --ntasks so an sbatch --ntasks-per-node=8 out of habit
  # does not start 8 agents per node); --kill-on-bad-exit ends every node when one fails.
  # Preemption: Slurm sends SIGUSR1 to this batch shell (--signal=B:USR1@120) before the time
  # limit; `scancel --batch --signal=USR1|TERM` does the same by hand. The trap sends SIGTERM to
  # every process of the training step (not to srun, which would cancel the step at once): the
  # torchrun agents pass it on and every rank sets its stop flag; the ranks agree at the next
  # round boundary, checkpoint and exit. The job then requeues itself and the requeued job
  # resumes from that checkpoint (`train` resumes by default).
  DGA_PREEMPTED=0
  trap 'DGA_PREEMPTED=1; dga_log "signal received: asking the ranks to checkpoint and stop"; dga_signal_step' USR1 TERM
  srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    "${srun_extra[@]}" \
    torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" \
      --rdzv_backend c10d --rdzv_endpoint "$addr:$port" --rdzv_id "$SLURM_JOB_ID" \
      "${torchrun_extra[@]}" \
      -m dist_gradalign train "$@" &
  DGA_SRUN_PID=$!
  local rc=0
  wait "$DGA_SRUN_PID" || rc=$?
  while kill -0 "$DGA_SRUN_PID" 2>/dev/null; do  # wait returns early when a trap fires
    wait "$DGA_SRUN_PID" || rc=$?
  done
  trap - USR1 TERM
  if [ "$DGA_PREEMPTED" = 1 ]; then
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
      scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" && dga_log "requeued; it will resume from its checkpoint"
    else
      scontrol requeue "$SLURM_JOB_ID" && dga_log "requeued; it will resume from its checkpoint"
    fi
    return 0
  fi
  return "$rc"
}
