#!/usr/bin/env bash
# Mutation testing of the exact rules and the warpers with mutmut: small bugs are put into the
# code one at a time and the fast tests that reach the mutated function are run against each; a
# mutant no test fails "survived". Prints the kill rate per module and lists the survivors.
#
#   tools/mutation.sh                 every scoped module (about 25 minutes on 2 cores)
#   tools/mutation.sh token block     only these (token block tree greedy sampling warpers)
#   tools/mutation.sh engine stats    the engine's step and its statistics, against tests/engine
#                                     (not in the default set: its statistical tests are long)
#   tools/mutation.sh length          the draft-length policies and the cost memory, against the
#                                     engine tests that drive them (not in the default set)
#
# The tests selected are those of the modules asked for (TESTS below): tests/rules and
# tests/warpers for the rules and the warpers (RowSampling and warp_rows have their unit tests in
# tests/warpers/test_rows.py), tests/engine for the engine and its statistics. A module's mutants
# are run only against the tests that reached it, so a narrower selection is faster, not weaker,
# as long as the fast unit tests of the module are in it.
#
# Runs in build/mutation/ (a copy of src/ and of the tests it needs), so the working tree is
# never touched. After a run, `cd build/mutation && ../../.venv/bin/mutmut show NAME` prints a
# mutant's diff. Before resolving an issue that touches these modules, run it and compare with
# docs/mutation.md, which lists the survivors known to be equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON="$ROOT/.venv/bin/python"
MUTMUT="$ROOT/.venv/bin/mutmut"
WORK="${MUTATION_DIR:-$ROOT/build/mutation}"  # where the run happens; wiped first

declare -A SOURCE=(
    [token]=src/specsample/rules/token.py
    [block]=src/specsample/rules/block.py
    [tree]=src/specsample/rules/tree.py
    [greedy]=src/specsample/rules/greedy.py
    [sampling]=src/specsample/rules/sampling.py
    [warpers]=src/specsample/warpers/__init__.py
    [engine]=src/specsample/engine/engine.py
    [stats]=src/specsample/engine/stats.py
    [length]=src/specsample/engine/length.py
)
# The tests each module is run against (directories or files under tests/; the union for several
# modules). The length policies are run against their unit tests, the cost memory's and the pass
# fit's, and the engine tests that step with them (the rest of tests/engine reaches length.py
# only through the engine's step, as test_engine.py does, and would add minutes per survivor).
declare -A TESTS=(
    [token]=rules [block]=rules [tree]=rules [greedy]=rules [sampling]=rules
    [warpers]="rules warpers"
    [engine]=engine [stats]=engine
    [length]="engine/test_length.py engine/test_length_costs.py engine/test_length_recall.py
              engine/test_length_batch.py engine/test_length_verdict.py engine/test_memory.py
              engine/test_fit_passes.py engine/test_engine.py engine/test_coupled.py"
)
MODULES=("$@")
if [ ${#MODULES[@]} -eq 0 ]; then
    MODULES=(token block tree greedy sampling warpers)
fi
ONLY=""
declare -A DIRS=()
for module in "${MODULES[@]}"; do
    if [ -z "${SOURCE[$module]:-}" ]; then
        echo "tools/mutation.sh: unknown module '$module'; expected one of: ${!SOURCE[*]}" >&2
        exit 2
    fi
    ONLY+="\"${SOURCE[$module]}\", "
    for dir in ${TESTS[$module]}; do
        DIRS[$dir]=1
    done
done
SELECTION=""
for dir in "${!DIRS[@]}"; do
    # A file already inside a selected directory is not named twice.
    if [ "$dir" != "${dir%%/*}" ] && [ -n "${DIRS[${dir%%/*}]:-}" ]; then
        continue
    fi
    SELECTION+="\"tests/$dir\", "
done
# Engine runs leave out the slowest tests of tests/engine (2-30 s each, about three quarters of
# its time): nearly every test reaches the engine's step, so each surviving mutant of it runs all
# of them, and with these it cost minutes. Left out (15 tests): the statistical exactness tests
# of the tree drafters, of the adaptive length without pauses, of k = 3 and of the drafter-side
# stops, the joining test with a tree drafter, and the tests on the transformers model (their
# engine paths are those of the toy-model tests).
# Kept: the other exactness tests, and the deterministic engine tests with every drafter (trees
# included). docs/mutation.md says which survivors were checked against the tests left out.
DESELECT="negative_control or fails_the_same"
ENGINE_TESTS=""
for dir in "${!DIRS[@]}"; do
    if [ "${dir%%/*}" = engine ]; then  # tests/engine, or files in it
        ENGINE_TESTS=1
    fi
done
if [ -n "$ENGINE_TESTS" ]; then
    DESELECT+=" or (joint_matches_target_joint and (tree- or chains- or never-paused"
    DESELECT+=" or model-k3 or survival-stop or confidence-stop)) or tree-joining-aborts"
    DESELECT+=" or uncached_argmax_loop or target_only_greedy_hf"
fi

# The tool is not a dependency of the package or of its tests: installed here on first use.
if ! "$PYTHON" -c "import mutmut" 2>/dev/null; then
    "$PYTHON" -m pip install -q "mutmut>=3.8,<4"
fi

rm -rf "$WORK"
mkdir -p "$WORK/tests"
cp -r src "$WORK/src"
cp -r tests/rules tests/warpers tests/engine tests/helpers.py tests/stats_identities.py "$WORK/tests/"
cp pyproject.toml "$WORK/"
# Each mutant runs only the tests that reached its function when every test ran once unmutated,
# fastest first, up to the first failure, on one CPU thread. With t the time those tests took on
# the unmutated run, mutmut stops a mutant after 10 x (t + 5 s) of CPU time or 5 x (t + 5 s) of
# wall time, and counts it as a timeout (killed). The wall limit is what a loaded machine hits: at
# mutmut's own multiplier of 2 (a wall limit of t + 5 s) a survivor that ran slower than on the
# unmutated run, because other work took the CPUs, counted as killed. Left out: the negative
# controls (they show that a statistical or enumeration test can fail; they test a wrong rule,
# not the code under mutation) and the text of `raise` statements (the bad-input tests check
# which argument an error names, not its wording; the conditions that raise are mutated).
cat >> "$WORK/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["src"]
only_mutate = [${ONLY%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-k", "not ($DESELECT)"]
do_not_mutate_patterns = ['^\\s*raise ']
pytest_add_cli_args_test_selection = [${SELECTION%, }]
timeout_multiplier = 10.0
timeout_constant = 5.0
process_isolation = "forkserver"
use_git_change_detection = false
EOF

cd "$WORK"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
started=$(date +%s)
nice -n 10 "$MUTMUT" run --max-children 2 > run.log 2>&1 || {
    echo "mutmut run failed; the end of build/mutation/run.log:" >&2
    tail -n 30 run.log >&2
    exit 1
}
"$MUTMUT" results --all true > results.txt
minutes=$((($(date +%s) - started) / 60))

# results.txt: "    specsample.rules.token.x_keep_mask__mutmut_3: killed", one line per mutant. The kill
# rate counts killed and timed-out mutants over all mutants; "no tests" (no selected test reaches
# the function) counts against it and is listed by function.
"$PYTHON" - "${MODULES[@]}" <<'PY'
import collections
import re
import sys

modules = sys.argv[1:]
counts = collections.defaultdict(collections.Counter)
survivors, untested = [], collections.Counter()
for line in open("results.txt"):
    name, _, status = line.strip().rpartition(": ")
    if not name:
        continue
    path = name.split(".x")[0]  # specsample.rules.token, or specsample.warpers
    module = path.rsplit(".", 1)[-1]
    counts[module][status] += 1
    if status == "no tests":
        untested[re.sub(r"__mutmut_\d+$", "", name)] += 1
    elif status not in ("killed", "timeout"):
        survivors.append(f"{name}: {status}")
header = ("module", "mutants", "killed", "timeout", "survived", "no tests", "other", "kill rate")
print("{:<10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>10}".format(*header))
total = collections.Counter()
for module in modules + ["all"]:
    c = total if module == "all" else counts[module]
    if module != "all":
        total.update(c)
    n = sum(c.values())
    caught = c["killed"] + c["timeout"]
    other = n - caught - c["survived"] - c["no tests"]
    rate = f"{100 * caught / n:.1f}%" if n else "-"
    row = (module, n, c["killed"], c["timeout"], c["survived"], c["no tests"], other, rate)
    print("{:<10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>10}".format(*row))
print(f"\n{len(survivors)} not killed (cd build/mutation && ../../.venv/bin/mutmut show NAME):")
for line in survivors:
    print("  " + line)
if untested:
    print("\nFunctions no selected test reaches (mutants):")
    for function, n in sorted(untested.items()):
        print(f"  {function}: {n}")
PY
echo "($minutes minutes)"
