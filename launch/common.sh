# Helpers sourced by launch/local.sh and launch/tpu_vm.sh. launch/slurm.sbatch keeps
# its own show_cmd: sbatch runs a spooled copy of the script, away from this file.
# The sourcing script sets PROG (its file name) first.

die() {
  echo "$PROG: $*" >&2
  echo "Run launch/$PROG -h for usage." >&2
  exit 2
}

# A missing value must not swallow the next option (-w --dry-run would then run for real).
need_value() { [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"; }

# Prints a command so that it can be pasted into a shell: plain words as they
# are, others single-quoted (after their "--flag=" or "VAR=" part, for reading).
show_cmd() {
  local out="" word prefix q="'"
  for word in "$@"; do
    prefix=""
    if [[ ! $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      if [[ $word =~ ^(-{0,2}[A-Za-z0-9_.-]+=)(.*)$ ]]; then
        prefix=${BASH_REMATCH[1]}
        word=${BASH_REMATCH[2]}
      fi
      word="$q${word//$q/$q\\$q$q}$q"
    fi
    out+="$prefix$word "
  done
  printf '%s\n' "${out% }"
}
