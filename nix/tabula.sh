#!/bin/sh
# tabula: Tabula's deploys run by pyinfra, from any folder (the NixOS installer, a clone, elsewhere).
#
#   tabula INVENTORY [deploy|gaps|rescue] [pyinfra options]    pyinfra INVENTORY <tabula>/deploy.py ...
#   tabula verify [pytest options]                              pytest <tabula>/tests/verify ...
#
#   tabula @local --dry                      the plan on the live system itself, nothing run
#   tabula @local --data tabula_vars='{"disk": "/dev/disk/by-id/nvme-..."}'
#   tabula install-target gaps               the gap report over SSH
#   tabula @local rescue --dry
#   tabula verify --hosts=local://           the verification, on the machine itself
#
# INVENTORY is what pyinfra takes: @local, an SSH host or alias, an inventory file. Data comes as
# for pyinfra: --data KEY=VALUE, --group-data DIR, ./group_data, the inventory file's group_data;
# Tabula's own group_data/ (the default profile) only where neither folder has one.
set -eu
share='@share@'
python='@python@'
export PYTHONPATH="$share${PYTHONPATH:+:$PYTHONPATH}"

case "${1:-}" in
    ""|-h|--help)
        sed -n '2,16s/^# \{0,1\}//p' "$0"
        exit 0 ;;
    verify)
        shift
        exec "$python" -m pytest "$share/tests/verify" --rootdir "$share" -p no:cacheprovider "$@" ;;
esac

inventory=$1
shift
deploy=deploy
case "${1:-}" in
    deploy|gaps|rescue) deploy=$1; shift ;;
esac

inventory_dir=.
[ -f "$inventory" ] && inventory_dir=$(dirname "$inventory")
if [ -d group_data ] || [ -d "$inventory_dir/group_data" ]; then
    exec "$python" -m pyinfra "$inventory" "$share/$deploy.py" "$@"
fi
exec "$python" -m pyinfra --group-data "$share/group_data" "$inventory" "$share/$deploy.py" "$@"
