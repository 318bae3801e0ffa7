# Sourced by the device_*.sh scripts: the output folder ($OUT, or ./bench-out) in `out`,
# created, and every `.device/*.xz` unpacked beside itself and made executable.
out=${OUT:-bench-out}
mkdir -p "$out"
for packed in .device/*.xz; do
    [ -e "$packed" ] && xz -dkf "$packed" && chmod +x "${packed%.xz}"
done
