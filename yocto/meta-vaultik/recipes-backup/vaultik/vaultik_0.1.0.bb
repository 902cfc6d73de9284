SUMMARY = "vaultik backup agent: encrypted, deduplicated, incremental backups to S3"
DESCRIPTION = "Chunks files with content-defined chunking, deduplicates them against \
               a local SQLite index, compresses with zstd, encrypts to age public keys \
               only and streams them to S3-compatible storage. Joins a vaultik fleet \
               controller over MQTT/TLS."
HOMEPAGE = "https://github.com/vaultik/vaultik"
BUGTRACKER = "https://github.com/vaultik/vaultik/issues"
CVE_PRODUCT = "vaultik"
SECTION = "admin"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://Cargo.toml;beginline=9;endline=9;md5=86b31c7756a1a7962f28b62856ed4f05"

PV .= "+git"

SRC_URI = "git://github.com/vaultik/vaultik.git;protocol=https;branch=main"
# The release's commit: kas-raspberrypi.yml pins it (SRCREV:pn-vaultik); a plain build
# follows the branch.
SRCREV ?= "${AUTOREV}"

# The crates from Cargo.lock, written by yocto/update-crates.sh.
require vaultik-crates.inc

inherit cargo cargo-update-recipe-crates systemd useradd

# Only the agent, with the size-optimised profile the release uses.
CARGO_BUILD_FLAGS:append = " -p edge-agent"

SYSTEMD_SERVICE:${PN} = "vaultik-agent.service vaultik-backup.service vaultik-backup.timer"
SYSTEMD_AUTO_ENABLE:${PN} = "disable"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/vaultik --no-create-home --shell /sbin/nologin --user-group vaultik"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/vaultik-agent.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/vaultik-backup.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/systemd/vaultik-backup.timer ${D}${systemd_system_unitdir}/
    install -d -m 0750 ${D}${sysconfdir}/vaultik
    install -m 0600 ${S}/deploy/agent.yaml ${D}${sysconfdir}/vaultik/agent.yaml
}

CONFFILES:${PN} = "${sysconfdir}/vaultik/agent.yaml"
