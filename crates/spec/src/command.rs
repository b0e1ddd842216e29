//! Finding `command[0]` before anything runs, the way `execvp` would.

use std::ffi::OsStr;
use std::path::Path;

/// Checks that `program` can be executed.
///
/// A name containing `/` is a path, resolved against `cwd` (the folder the
/// tasks run in); any other name is looked up in `$PATH`. The error is the
/// message to show, e.g. `command not found: "x" (not on PATH)`.
pub(crate) fn check(program: &str, cwd: &Path) -> Result<(), String> {
    if program.contains('/') {
        return check_path(program, cwd);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if on_path(program, &path) {
        Ok(())
    } else {
        Err(format!("command not found: \"{program}\" (not on PATH)"))
    }
}

/// A command given as a path: it must exist and be an executable file.
fn check_path(program: &str, cwd: &Path) -> Result<(), String> {
    let path = &cwd.join(program);
    match std::fs::metadata(path) {
        Err(_) => Err(format!(
            "command not found: \"{program}\" (no such file in {}, where the tasks run)",
            cwd.display()
        )),
        Ok(_) if !is_executable(path) => {
            Err(format!("command \"{program}\" is not an executable file"))
        }
        Ok(_) => Ok(()),
    }
}

/// Whether some directory of `path_var` holds an executable file `program`.
fn on_path(program: &str, path_var: &OsStr) -> bool {
    std::env::split_paths(path_var).any(|dir| {
        // An empty entry means the current directory, as in execvp.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".").to_path_buf()
        } else {
            dir
        };
        is_executable(&dir.join(program))
    })
}

/// Whether `path` is a regular file with an execute bit set (following symlinks).
fn is_executable(path: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.is_file() && meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        meta.is_file()
    }
}
