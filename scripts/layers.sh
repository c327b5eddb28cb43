#!/usr/bin/env bash
# Fails when a module of src/ uses one that comes later in the pipeline.
# Each top-level module has a rank; `use crate::X` (or any `crate::X` path
# outside comments) in a module of rank r must name a module of rank < r,
# or its own. The order is the one src/lib.rs's `# Layout` explains.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ranks=(
    testing                                    # what unit tests share (lib.rs)
    domain settings turns metrics trace wire update  # neutral ground
    store broker                               # infrastructure
    ingest apply broadcast hub photos          # the stages, in pipeline order
    http telemetry seed startup                # the edge and start-up
)
declare -A rank
for i in "${!ranks[@]}"; do rank[${ranks[$i]}]=$i; done

bad=0
while IFS= read -r file; do
    rel=${file#src/}
    module=${rel%%/*}
    module=${module%.rs}
    [[ $module == lib || $module == main ]] && continue
    if [[ -z ${rank[$module]+x} ]]; then
        echo "layers: src/$rel: module '$module' has no rank in scripts/layers.sh" >&2
        bad=1
        continue
    fi
    # Paths outside comments: `//` to the end of a line is dropped.
    while IFS=: read -r line used; do
        if [[ -z ${rank[$used]+x} ]]; then
            echo "layers: src/$rel:$line: crate::$used has no rank in scripts/layers.sh" >&2
            bad=1
        elif [[ $used != "$module" ]] && ((rank[$used] > rank[$module])); then
            echo "layers: src/$rel:$line: '$module' uses '$used', which comes later in the pipeline" >&2
            bad=1
        fi
    done < <(sed -E 's#//.*$##' "$file" | grep -noE 'crate::[a-z_]+' | sed -E 's/crate:://')
done < <(find src -name '*.rs' | sort)

if ((bad)); then
    echo "layers: dependencies must run towards the source (see src/lib.rs, # Layout)" >&2
    exit 1
fi
echo "layers: every module uses only earlier ones"
